"""The contract package between planning and execution.

``plans.schema`` is the plan file format, ``plans.errors`` the user-facing error type.
Both import nothing heavier than pydantic and PyYAML, so executors can read a plan
without importing the planner, the tracer or the cost model. The compiled plan files of
every example live beside this module (``plans/*.plan.yaml``).
"""
