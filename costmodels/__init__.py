"""Hardware catalog, per-op and collective costs, memory, calibration profiles, and the
serving simulator. Everything here is a pure function of (op graph, hardware, mesh, batch)."""
