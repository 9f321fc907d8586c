"""One error family for bad input. The CLIs catch MeshplanError and print one line, exit code 2."""

import re


class MeshplanError(Exception):
    """Anything a user can fix: bad specs, bad plans, missing files."""


FILE = "(file)"
"""SpecError's field for an error about a whole file rather than one of its fields."""


class SpecError(MeshplanError):
    """A field of an input (model, cluster, device, plan, results) is wrong.

    The message says which source, which field, what was seen and what was expected.
    """

    def __init__(self, source: str, field: str, message: str):
        self.source, self.field, self.message = source, field, message
        # FILE is the field of an error about the file as a whole (missing, unreadable, malformed): the line
        # names the file only. A source that names the field already is said once: `--model: unknown preset`.
        said = field == FILE or names_field(source, field)
        super().__init__(f"{source}: {message}" if said else f"{source}: {field}: {message}")


_UNITS = {"gib", "gb", "gbps", "s", "us", "pct", "usd"}  # the units field names end in (memory_headroom_gib), which no flag or label says


def names_field(source: str, field: str) -> bool:
    """Whether `source` (a flag or a picker's label, not a file) already says `field`, as `--global-batch` says
    global_batch, `--memory-headroom (default)` memory_headroom_gib and "Training tokens" tokens."""
    if "/" in source or "." in source:  # a file's path or name: its fields are other things
        return False
    words = set(re.findall(r"[a-z0-9]+", source.lower()))
    wanted = set(re.findall(r"[a-z0-9]+", field.lower())) - _UNITS
    return bool(wanted) and wanted <= words



class PlanError(MeshplanError):
    """A parallel configuration that cannot be built (e.g. tp*pp*dp != GPUs, layers < stages)."""
