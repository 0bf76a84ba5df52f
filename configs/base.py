"""Every field of a mosaic_jax experiment, with its default and why.

Model files (gemma2b.py, gemma3_270m.py, ...) start from `get_config()` here and change
only what differs. Any field can be overridden on the command line:

    python main.py --config=configs/gemma2b.py --config.model.dtype=bfloat16 \
            --config.features.pooling='("mosaic","mean")' --config.workdir=/tmp/runs
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()

    # What to do: 'classify' (extract features, train probes, write results + report and
    # save the selected probes), 'predict' (apply a saved probe to new texts: c.predict),
    # 'report' (only rebuild the HTML report of an existing workdir), 'label_correctness'.
    c.mode = 'classify'
    # Results go to <workdir>/<model.name>/<dataset>/layer_<L>/<width>/<run_id>/ (MOSAIC layout).
    c.workdir = 'runs'
    # Run folder name; empty = a UTC timestamp like MOSAIC's (20241121_202159).
    c.run_id = ''
    # One seed for splits, probe init and minibatch order.
    c.seed = 0
    # Repeat split + probes for each of these seeds (features are extracted once) and
    # write seeds.csv with mean +- std over seeds; () = just `seed`.
    c.seeds = ()

    c.model = ml_collections.ConfigDict()
    # Short name used in result paths (MOSAIC uses the hub id with '/' -> '_').
    c.model.name = 'google_gemma-2-2b'
    # Hub id, local HF folder (config.json + safetensors), a .gguf file, or 'gemma3_270m'
    # (the pip-shipped real Gemma 3 270M). Point it at local weights when offline.
    c.model.path = 'google/gemma-2-2b'
    # Compute dtype of the forward pass: float32 or bfloat16. float16 is refused: Gemma
    # residual streams exceed 65,504 at the BOS position.
    c.model.dtype = 'float32'
    # 'gemma_scope': layer L = residual after block L (Gemma Scope's naming, HF
    # hidden_states[L + 1]). 'hf_hidden_states': layer L = hidden_states[L], one block
    # earlier, which is what MOSAIC's extraction reads; use it to reproduce MOSAIC.
    c.model.layer_convention = 'gemma_scope'
    # float32 matmul precision on GPU/TPU ('highest' = true float32, matching the torch
    # reference; 'default' lets XLA use TF32/bf16 passes: faster, ~1e-3 relative drift).
    c.model.matmul_precision = 'highest'
    # Texts longer than this many tokens are truncated (the count is reported).
    c.model.max_length = 256
    # Texts per forward batch (global, split over devices; must divide by the device count).
    c.model.batch_size = 16
    # Padding side for batches. Both are exact (positions come from the mask).
    c.model.pad_side = 'right'

    # Residual layers to read (meaning set by model.layer_convention).
    c.layers = (5, 12, 19)

    c.sae = ml_collections.ConfigDict()
    # Where each SAE comes from; {layer} and {width} are filled in. A hub reference
    # (repo/layer_L/width_W/average_l0_N or .../canonical), a Gemma Scope params.npz,
    # a SAELens folder or one of our orbax SAE folders.
    c.sae.source = 'google/gemma-scope-2b-pt-res/layer_{layer}/width_{width}/canonical'
    # SAE widths to compare, as named in the source ('16k', '65k', ...).
    c.sae.widths = ('16k',)
    # 'layer:width' pairs of the layers x widths grid that have no SAE and are skipped.
    c.sae.exclude = ()
    # Encode and pool in blocks of this many latents (0 = whole width at once): the
    # [B, L, F] codes never exist, which bounds peak memory for 65k-1M wide SAEs.
    c.sae.chunk_size = 0

    c.features = ml_collections.ConfigDict()
    # Poolings of per-token SAE activations into one vector per text:
    # 'mosaic' (MOSAIC's top-n counts), 'mean', 'max', 'sum', 'last'.
    c.features.pooling = ('mosaic', 'mean', 'max')
    # top_n values of the 'mosaic' pooling (see features.py; 0 = summed activations). A
    # tuple is a sweep from ONE extraction: --config.features.top_n='(0,20,50)'.
    c.features.top_n = (0,)
    # Train a probe on raw pooled values (False) and/or on (pooled > threshold) (True).
    c.features.binarize = (False, True)
    # MOSAIC's default binarization threshold.
    c.features.threshold = 1.0
    # False: padding and BOS never count (BOS carries huge, text-independent activations).
    # True: every position counts, padding included, as in MOSAIC's extraction.
    c.features.include_special = False
    # Image datasets ('images:<folder|table|hub:id>', PaliGemma models only): which decoder
    # positions are pooled: 'image' (the projected patches), 'prompt' (the text after
    # them) or 'both'.
    c.features.positions = 'image'
    # The 'pixels' baseline: logistic regression on side x side x 3 box-filtered thumbnails.
    c.features.pixel_side = 8

    c.probe = ml_collections.ConfigDict()
    # Inverse L2 strengths (sklearn's C), all trained in one vmapped call; the best on
    # the validation split is reported on test.
    c.probe.Cs = (0.01, 0.1, 1.0, 10.0)
    # 'balanced' reweights classes like sklearn; '' for none.
    c.probe.class_weight = 'balanced'
    # Standardise features before the probe (mean/std of the training split).
    c.probe.standardize = False
    # 'lbfgs' (full batch) or 'adam' (minibatch, early stopping; MOSAIC's recipe).
    c.probe.solver = 'lbfgs'
    # Iterations of L-BFGS / epochs of Adam.
    c.probe.max_iter = 500
    # How C, the variant of each SAE and the baselines' settings are chosen: 'val' (the
    # validation split) or 'cv' (stratified K-fold over train + val, copies of a text in
    # one fold; the choice is refitted on train + val). Test rows never choose anything.
    # 'cv' by default: a 10% validation split (~100 texts) is too noisy to choose among ~30
    # candidates; K-fold costs K + 1 fits per candidate instead of one (README: timings).
    c.probe.select = 'cv'
    c.probe.select_folds = 5
    # k-sparse probes on each SAE's chosen variant (sae-probes / SAEBench): k latents picked
    # on the training rows by |class-mean difference| ('mean_diff') or an L1 path ('l1'),
    # then the usual probe; rows of kind 'sparse' with a column k. () = off.
    c.probe.sparse_k = ()
    c.probe.sparse_method = 'mean_diff'
    # Standardise hidden-state features (their few massive dimensions make an unscaled
    # L2 probe ill-conditioned; any sklearn user would scale them).
    c.probe.hidden_standardize = True
    # 'cached': extract pooled features once, then fit every probe from them (default).
    # 'fused': one compiled step does forward -> SAE -> pool -> probe update (streaming).
    c.probe.train = 'cached'
    # Threads fitting a dataset's probes side by side (cached training; results equal one
    # thread's). A dense variant of over 128 MiB (e.g. 4,000 texts x 16k) uses 1 (memory).
    c.probe.threads = 2
    # Fused training: epochs over the training split, Adam learning rate, and which
    # pooling/binarize variant and C the single streamed probe uses.
    c.probe.fused_epochs = 3
    c.probe.fused_lr = 1e-3
    c.probe.fused_variant = 'mean'
    c.probe.fused_binarize = False
    c.probe.fused_C = 1.0

    c.data = ml_collections.ConfigDict()
    # Datasets: registry names (data.DATASETS), 'sae_probes:<name>', or local files.
    c.data.datasets = ('sae_probes:95_toxic_is',)
    # Column names for local files / hub ids not in the registry.
    c.data.text_field = 'prompt'
    c.data.label_field = 'target'
    # Text encoding of local CSV / JSON files (a spec's encoding= overrides it per dataset).
    c.data.encoding = 'utf-8'
    # Keep at most this many rows per dataset (stratified, seeded); 0 = all.
    c.data.max_rows = 0
    # Train / validation / test fractions (stratified).
    c.data.fractions = (0.7, 0.1, 0.2)
    # Rows whose texts are identical after whitespace collapse + casefold: 'group' (all
    # copies in one split), 'drop' (keep the first copy) or 'keep' (per-row split; leaky:
    # test texts can sit in train verbatim).
    c.data.duplicates = 'group'
    # A class too small to reach train, val and test is an error; True drops it instead
    # (with a warning).
    c.data.drop_rare_classes = False
    # Transfer runs (e.g. cross-lingual): a column naming each row's group, or
    # 'group=spec' parts combined into one dataset called group_name. Probes train on each
    # of train_groups (() = every group in turn) and are tested on every group
    # (_runs/<run_id>/transfer.csv, feature_overlap.csv).
    c.data.group_field = ''
    c.data.group_parts = ()
    c.data.group_name = 'grouped'
    c.data.train_groups = ()
    # Image datasets: the text after `<image>` x P + BOS (PaliGemma's task prefix), and the
    # image-path column of a CSV / parquet table ('' = 'image'; hub datasets: the first
    # Image feature). Their labels come from data.label_field (folders: the sub-folders).
    c.data.prompt = 'caption en'
    c.data.image_field = ''
    # Image tables / hub datasets: a caption column ('' = none). With captions the run is a
    # modality transfer (captions read as text, train on one modality, test on the other:
    # transfer.csv, groups 'text' and 'image').
    c.data.caption_field = ''

    # Baselines beside the SAE probes: 'hidden_last' (MOSAIC's last-token hidden state),
    # 'hidden_mean', 'tfidf', 'decision_tree' (on SAE features, for interpretability),
    # 'pixels' (image datasets: logistic regression on downsampled pixels).
    c.baselines = ('hidden_last', 'hidden_mean', 'tfidf', 'decision_tree')
    # Metrics reported; the first is the headline.
    c.metrics = ('macro_f1', 'accuracy', 'roc_auc')
    # K of the stratified K-fold cross-validation of the chosen probe (0 = skip).
    c.cv_folds = 0
    # Bootstrap resamples of every test metric's 95% interval (0 = no intervals).
    c.n_bootstrap = 1000

    # Explanations of each selected SAE probe's top features from the training texts
    # (experiments/explain.py): <run>/features/<dataset>_layer_<L>_<width>.json and the report.
    c.explain = ml_collections.ConfigDict()
    c.explain.enabled = True
    c.explain.top_k = 10      # features per class, by weight x mean pooled value
    c.explain.examples = 5    # top-activating training texts per feature (one per text)

    # mode='predict': apply a classify run's saved probe (experiments/predict.py) to
    # data.datasets[0]; writes predictions.csv (+ scores when it has a label column).
    c.predict = ml_collections.ConfigDict()
    c.predict.probe = ''      # <workdir>/<model>/_runs/<run_id> of the classify run
    c.predict.dataset = ''    # which of its datasets' probes ('' = its only one)
    c.predict.kind = 'sae'    # 'sae' | 'hidden' | 'tfidf'
    c.predict.top_k = 3       # features per text with their contributions (SAE probes)

    # The feature store (mosaic_jax/store.py): pooled features saved under root (''
    # = <workdir>/_features) as extraction goes, read back by any later run with the same
    # model, SAE, variants and texts; a killed run resumes. enabled=False: extract in memory.
    c.store = ml_collections.ConfigDict()
    c.store.enabled = True
    c.store.root = ''
    c.store.shard_texts = 256  # texts per shard (what a killed run can lose)

    # Persistent XLA compilation cache ('' = off): a second run with the same shapes
    # compiles nothing; timings.json reports '<dataset>/compile' seconds either way.
    c.compile_cache = '~/.cache/mosaic_jax/xla'

    c.parallel = ml_collections.ConfigDict()
    # 'pmap' (local devices, batch split), 'mesh' (jax.sharding over a 1-D data mesh,
    # also multi-host) or 'single' (one device).
    c.parallel.mode = 'pmap'
    # Multi-host: call jax.distributed.initialize() first (TPU VMs need no address).
    c.parallel.distributed = False
    c.parallel.coordinator_address = ''
    c.parallel.num_processes = 0
    c.parallel.process_id = -1
    # Use gloo collectives on CPU (multi-process CPU runs and tests).
    c.parallel.cpu_collectives = ''

    # mode='label_correctness': greedy answers of model.path over a question set, labelled
    # correct / wrong (correctness.py) -> _runs/<run_id>/correctness.csv, a dataset for a
    # classify run on another model's features (cross-model transfer).
    c.correctness = ml_collections.ConfigDict()
    c.correctness.source = 'builtin:arithmetic'  # or a dataset spec with the fields below
    c.correctness.question_field = 'question'
    c.correctness.answer_field = 'answer'
    c.correctness.answer_kind = 'exact'  # 'exact' (normalised match) or 'choice' (A-E)
    c.correctness.n = 200
    c.correctness.max_new_tokens = 6
    c.correctness.batch_size = 16

    # Write the HTML report after classification.
    c.report = True
    return c
