"""Pure SteerLM / HelpSteer logic: attribute schema, conditioning format, records, readers,
filters and synthetic data. Nothing here imports ray, mlflow or deepspeed (a test enforces it),
so every piece can be unit-tested in a plain Python process."""
