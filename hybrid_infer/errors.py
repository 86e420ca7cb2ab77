"""User-facing errors.

Every problem a user can fix (bad file, unknown layer, wrong input) is raised as a
``HybridInferError`` whose message names the file, layer or blob and says what to do;
the CLI prints it on one line and exits with code 2. Anything else is a bug in
hybrid_infer and keeps its traceback.
"""
from __future__ import annotations


class HybridInferError(Exception):
    """A problem with the user's model, inputs or options, explained in the message."""


class ModelError(HybridInferError):
    """The prototxt or caffemodel cannot be used as given."""


class InputError(HybridInferError):
    """An input tensor or input file does not fit the model."""


class OptionError(HybridInferError):
    """An option (profile, fallback name, partition spec, path) is not valid."""


class EnvironmentProblem(HybridInferError):
    """Something hybrid_infer needs is not installed or not usable on this machine."""
