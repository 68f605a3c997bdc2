"""One entry point per stage (`python -m ray_jobs.<stage> --config FILE [key=value ...]`), each a
thin Ray orchestration over `helpsteer_core`, plus MLflow tracking and the `helpsteer` CLI."""
