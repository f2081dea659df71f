"""Fit the T2 contrast check's classifier (bundle/scripts/runtime/contrast.py, CLASSIFIER) and measure it on cases it
never saw. Features of the four modalities of full-size phantom cases (scripts.runtime.contrast.t2_features); a
logistic regression (Newton steps, L2 penalty, the T2 class weighted as the three others together) on the cases of
seed 0 of every domain; then every modality of the cases of seed 1000 of every domain, counted against the 0.5
threshold. Prints the CLASSIFIER dict to paste and the held-out counts.

    python tools/fit_contrast.py [--fit 40] [--held_out 32] [--workers 2]
"""

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))
from scripts import phantom  # noqa: E402
from scripts.runtime.contrast import t2_features  # noqa: E402

DOMAINS = ("randomised", "shifted", "fixed")


def case_features(job):
    stream, i, domain = job
    case = phantom.make_case(phantom.case_seed(stream, i, domain), domain=domain)
    return domain, i, {m: t2_features(case[m]) for m in phantom.MODALITIES}


def collect(stream: int, counts: dict, workers: int):
    jobs = [(stream, i, d) for d, n in counts.items() for i in range(n)]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(case_features, jobs))


def fit(x: np.ndarray, y: np.ndarray, penalty: float = 1.0, steps: int = 50):
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w_class = np.where(y == 1, (y == 0).sum() / max((y == 1).sum(), 1), 1.0)
    w = np.zeros(z.shape[1])
    reg = penalty * np.eye(z.shape[1])
    reg[-1, -1] = 0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (w_class * (p - y)) + reg @ w
        hess = (z * (w_class * p * (1 - p))[:, None]).T @ z + reg
        w -= np.linalg.solve(hess, grad)
    return {"mean": mean, "std": std, "weights": w[:-1], "bias": w[-1]}


def probability(model: dict, f: np.ndarray) -> float:
    z = (f - model["mean"]) / model["std"]
    return float(1 / (1 + np.exp(-(z @ model["weights"] + model["bias"]))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=40, help="cases per domain (randomised, shifted; half as many fixed)")
    ap.add_argument("--held_out", type=int, default=32, help="unseen cases per domain")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    fit_cases = collect(0, {"randomised": args.fit, "shifted": args.fit, "fixed": args.fit // 2}, args.workers)
    x = np.array([f for _, _, fs in fit_cases for f in fs.values()])
    y = np.array([m == "t2" for _, _, fs in fit_cases for m in fs], dtype=float)
    model = fit(x, y)
    print("CLASSIFIER = {")
    for key in ("mean", "std", "weights"):
        print(f'    "{key}": [' + ", ".join(f"{v:.5f}" for v in model[key]) + "],")
    print(f'    "bias": {model["bias"]:.5f},\n}}')
    train_p = [(m, probability(model, f)) for _, _, fs in fit_cases for m, f in fs.items()]
    print(f"fitted on {len(fit_cases)} cases x 4 modalities; lowest T2 {min(p for m, p in train_p if m == 't2'):.3f}, "
          f"highest other {max(p for m, p in train_p if m != 't2'):.3f}")
    held = collect(1000, {d: args.held_out for d in DOMAINS}, args.workers)
    print("| domain | cases | T2 accepted | lowest T2 p | T1 / T1ce / FLAIR accepted | highest other p |")
    print("|---|---|---|---|---|---|")
    for domain in DOMAINS:
        rows = [fs for d, _, fs in held if d == domain]
        p = {m: [probability(model, fs[m]) for fs in rows] for m in phantom.MODALITIES}
        others = [v for m in ("t1", "t1ce", "flair") for v in p[m]]
        accepted = " / ".join(str(sum(v >= 0.5 for v in p[m])) for m in ("t1", "t1ce", "flair"))
        print(f"| {domain} | {len(rows)} | {sum(v >= 0.5 for v in p['t2'])} | {min(p['t2']):.3f} | {accepted} | "
              f"{max(others):.3f} |")


if __name__ == "__main__":
    main()
