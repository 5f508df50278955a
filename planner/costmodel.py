"""The cost model, as ``planner.costmodel``: the module is ``runtime.costmodel`` (the runtime
decides per call shape with it, below the planner), under its user-facing name. It is the same
module object, so setting an attribute here (a profile, a test's ``profile_for``) is seen by
the runtime."""
import sys

from runtime import costmodel as _costmodel

sys.modules[__name__] = _costmodel
