"""The distributed program on Ray: `program.py` wires the nodes of `nodes.py` (Reverb server,
inserters, learner, evaluators, fine-tuning actors); `variable_server.py` shares the learner's
params; `commands.py` holds `scaled-ql train` and `scaled-ql demo`. Importing this package
imports neither Ray nor JAX."""
