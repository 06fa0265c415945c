"""Evaluation: reference scores and human normalization (`normalization`), rliable aggregates
(`metrics`), the online ALE evaluator (`evaluator`), evaluation logs and reports (`report`,
`plots`). Modules are imported explicitly (`from scaled_ql.eval import evaluator`) so that the
light ones (normalization, metrics) do not pull in the emulator or JAX."""
