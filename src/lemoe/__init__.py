"""lemoe: lifelong knowledge editing of language models.

Import what you need from the subpackages: ``lemoe.models`` (loading, model access),
``lemoe.requests``, ``lemoe.data``, ``lemoe.methods``, ``lemoe.evaluation``, ``lemoe.runner``.
Importing lemoe has no side effects.
"""

__version__ = "0.1.0"
