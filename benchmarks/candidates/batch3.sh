run() { /work/main/.venv/bin/python benchmarks/candidates/proto.py "$1" "$2"; }
run gate8-0-2 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0}'
run gate8-0-1 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "hi": 1.0}'
run gate8-0-4 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "hi": 4.0}'
run gate8-0-1.5 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "hi": 1.5}'
run gate8-0.2-2 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "lo": 0.2}'
run gate8-dc2 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "gate_dc": 2.0}'
run gate8-negmom0.3 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "momentum": -0.3}'
run gate8-mom0.5 '{"comp": "gate", "lam0": 8.0, "power": 0, "clip": 0, "momentum": 0.5}'
