"""The base class for errors a user can fix; stages and the CLI print their message, not a
traceback."""

from pipeline.model.errors import ModelError


class PipelineError(Exception):
    """A problem with input, parameters or environment whose message says what to do."""


# What the stage runner and the CLI turn into one line and exit code 2. The model package
# has its own base (it travels inside logged models and imports nothing else from here).
USER_ERRORS = (PipelineError, ModelError)
