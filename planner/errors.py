"""One error family for bad input. The CLIs catch MeshplanError and print one line, exit code 2."""


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
        # names the file only.
        super().__init__(f"{source}: {message}" if field == FILE else f"{source}: {field}: {message}")



class PlanError(MeshplanError):
    """A parallel configuration that cannot be built (e.g. tp*pp*dp != GPUs, layers < stages)."""
