"""Operations around the ML core: the CLI, the local stack, the model registry, promotion, preflight
checks, run locks and reports. It may import the core (`opd`), `flows/` and Prefect; the core never
imports it."""
