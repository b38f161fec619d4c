"""The one base class for errors a user can fix; stages print their message, not a traceback."""


class PipelineError(Exception):
    """A problem with input, parameters or environment whose message says what to do."""
