"""The contract package between planning and execution.

``plans.schema`` is the plan file format, ``plans.mesh`` the parallel arithmetic that follows from a
plan's mesh (``ParallelDims``: ranks, head splits, shift modes, node crossings, encoder stages),
``plans.build`` the one plan builder, ``plans.errors`` the user-facing error type. They import
nothing heavier than pydantic and PyYAML, so executors can read a plan without importing the
planner, the tracer or the cost model. The compiled plan files of every example live beside this
module (``plans/*.plan.yaml``).
"""
