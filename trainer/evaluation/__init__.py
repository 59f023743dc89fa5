"""Full-catalogue evaluation: distributed ranking and metrics (workers), queries, baselines (driver)."""
