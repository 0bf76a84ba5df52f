"""The sae-probes benchmark (Kantamneni et al. 2025) on the offline Gemma 3 270M + one SAE.

Every classification dataset of the installed sae-probes package (113 binary, 20
multiclass; the 22 continuous-target ones are skipped and listed in benchmark.json), at most
`data.max_rows` rows each, the SAE probe grid and the hidden-state / TF-IDF baselines, in
five regimes from one extraction per dataset (experiments/benchmark.py). Resumable: rerun the
same command and finished datasets are read back, extracted texts come from the store.

  # binary datasets, standard regime (README: measured time)
  python main.py --config=configs/benchmark.py --config.benchmark.tasks='("binary",)' \
      --config.benchmark.regimes='("standard",)'
  # everything (all regimes, binary + multiclass)
  python main.py --config=configs/benchmark.py
  python -m mosaic_jax.experiments.claims --workdir=runs/benchmark --run_id=benchmark
"""
from configs import gemma3_270m


def get_config(arg=None):
    c = gemma3_270m.get_config(arg)
    c.mode = 'benchmark'
    c.workdir = 'runs/benchmark'
    c.run_id = 'benchmark'  # a fixed folder: rerunning resumes it
    c.layers = (8,)          # one layer and one shipped SAE (the middle depth)
    c.sae.widths = ('16k',)
    c.sae.exclude = ()
    # Rows per dataset (stratified, seeded; 0 = all, up to 5,000): at 500 the binary
    # standard regime (113 sets) took 78 min on 2 CPU cores, 83% of it extraction (README).
    c.data.max_rows = 500
    c.features.pooling = ('mosaic', 'mean', 'max')
    c.features.top_n = (20,)
    c.probe.Cs = (0.1, 1.0, 10.0)
    c.baselines = ('hidden_last', 'hidden_mean', 'tfidf')
    c.explain.enabled = False
    c.report = False

    c.benchmark = dict(
        # Which classification datasets: 'binary', 'multiclass' (sae-probes' own labels).
        tasks=('binary', 'multiclass'),
        # Dataset names ('95_toxic_is', ...); () = every dataset of `tasks`.
        datasets=(),
        # standard | scarcity | imbalance | noise | ood (experiments/regimes.py).
        regimes=('standard', 'scarcity', 'imbalance', 'noise', 'ood'),
        # Scarcity: training-set sizes (sizes not below the training pool are skipped).
        train_sizes=(16, 64, 256),
        # Imbalance (binary sets): positive-class fractions of the training set.
        positive_fractions=(0.05, 0.2),
        # Label noise: fractions of training labels changed.
        noise_fractions=(0.1, 0.3),
    )
    return c
