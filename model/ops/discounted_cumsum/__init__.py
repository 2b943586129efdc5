"""Linear recurrences with a constant scalar decay over the token axis: the fast path
(``interface``) and its oracle (``reference``)."""

from model.ops.discounted_cumsum.interface import discounted_cumsum
from model.ops.discounted_cumsum.reference import discounted_cumsum_ref

__all__ = ["discounted_cumsum", "discounted_cumsum_ref"]
