"""MGradInv (Deng et al., IJCNN 2025): multi-step gradient inversion by an honest-but-curious
server, its baselines and countermeasures (README, "Privacy attack: MGradInv").

- observer.py     the server-side recorder: target users' uploads and the global model of the
                  rounds they were seen (only what a real server sees; no ground truth)
- simulator.py    the upload a client with a given interaction set and user row sends
                  (differentiable torch model for MF/NCF, BPR/BCE)
- replay.py       the same upload through the package's own client code (exact replay)
- inversion.py    the attack: relaxed membership + user row, gradient distance over k rounds
- baselines.py    random guessing, MF sign split, id intersection, IMIA-style selection
- metrics.py      precision / recall / F1, AUC, embedding cosine (ground truth: scoring only)
- countermeasures.py  client-side LDP (clip + Gaussian), Laplace noise, padding
- runner.py       the simulation: an Engine that forces targets into chosen rounds, applies
                  countermeasures on the devices, and hands the uploads to the observer
- experiment.py   `fedrec privacy run`: sweeps, tables, plots
"""
