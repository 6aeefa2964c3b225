run() { /work/main/.venv/bin/python benchmarks/candidates/proto.py "$1" "$2" 1 4 8 16 32 64; }
run F-K128-l12-cent-5s '{"comp": "rankK", "K": 128, "lam0": 12.0, "power": 0, "clip": 0, "centered": 1, "seeds": 5}'
run F-K128-l8-cent-5s '{"comp": "rankK", "K": 128, "lam0": 8.0, "power": 0, "clip": 0, "centered": 1, "seeds": 5}'
