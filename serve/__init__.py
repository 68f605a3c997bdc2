"""Ray Serve deployments of the APM and the steerable generator, and their app builder.

    serve run serve/config.yaml
    helpsteer serve --generator runs/sft --apm runs/apm

An OpenAI-compatible chat endpoint that takes attributes, a scoring endpoint and APM-reranked
best-of-n steering (docs/serving.md). Modules, outside in:

    app          typed builder args (AppArgs), build_app, the config-file checks and launcher
    ingress      the FastAPI ingress deployment and its handle-backed clients
    api          the HTTP API: request -> prompt -> generator / APM -> response (no Ray)
    protocol     request bodies, their checks, OpenAI-shaped errors (no Ray)
    deployments  the Generator and APM deployments, batching with @serve.batch
    engine       batched per-choice sampling, stop strings and streaming on transformers (no Ray)
    steerable    a trained generator folder: its exact training prompt, context and stops (no Ray)
    vllm         the GPU generator through Ray Serve LLM, imported only when asked for
"""
