"""The distributed program on Ray: `program.py` wires the nodes of `nodes.py` (Reverb server,
inserters, learner, evaluators, fine-tuning actors); `variable_server.py` shares the learner's
params; `run.py` resolves a config, checks its data and runs the program (`demo.py`: the demo
job); `commands.py` only parses the flags of `scaled-ql train/demo/finetune`. Importing this package
imports neither Ray nor JAX."""
