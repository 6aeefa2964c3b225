run() { /work/main/.venv/bin/python benchmarks/candidates/proto.py "$1" "$2"; }
run gate8-show '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "show_r": 1, "seeds": 1}'
run gatelayer8 '{"comp": "gate_layer", "lam0": 8.0, "power": 0, "clip": 0}'
run gate8-la0.25-ga4 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "lookahead": 0.25, "gap_aware": 4.0}'
