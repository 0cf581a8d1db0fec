"""The planner: spec -> op graph -> costed candidates -> ILP -> plan file, and the `plan` CLI.

Importing this package is cheap (no torch); heavy stages import lazily.
"""

__version__ = "0.1.0"
