"""pyproject's ``filterwarnings``: a FutureWarning or DeprecationWarning pointing into splittrain fails the test run;
other libraries' own warnings do not."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest


def module_function(module: str, source: str) -> Callable[..., Any]:
    """``f`` defined by ``source`` as if it were code of ``module`` (warnings are attributed by ``__name__``)."""
    namespace: dict[str, Any] = {"__name__": module, "warnings": warnings}
    exec(compile(source, f"<{module}>", "exec"), namespace)
    return namespace["f"]


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_deprecations_from_splittrain_code_are_errors(category):
    own = module_function("splittrain.families", "def f(category): warnings.warn('old', category)")
    with pytest.raises(category):
        own(category)
    # A library deprecating how it is called warns at its caller (stacklevel=2, like transformers'
    # deprecate_kwarg): called from splittrain, that is splittrain's warning.
    library = module_function("transformers.masking_utils",
                              "def f(category): warnings.warn('renamed', category, stacklevel=2)")
    caller = module_function("splittrain.segments", "def f(call, category): call(category)")
    with pytest.raises(category):
        caller(library, category)


@pytest.mark.parametrize("module", ["transformers.masking_utils", "splittrainer.other", "tests.helpers"])
def test_other_modules_warnings_are_not_errors(module):
    other = module_function(module, "def f(): warnings.warn('theirs', FutureWarning); "
                                    "warnings.warn('theirs', DeprecationWarning)")
    with warnings.catch_warnings(record=True) as caught:
        other()
    assert [w.category for w in caught] == [FutureWarning, DeprecationWarning]
