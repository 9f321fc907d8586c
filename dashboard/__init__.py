"""Streamlit dashboard: plans, timelines and predicted vs measured (`streamlit run dashboard/app.py`)."""
