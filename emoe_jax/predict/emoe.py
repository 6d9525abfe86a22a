"""eMoE's task-aware expert selection (arXiv 2503.06823) as a Predictor.

Steps:
1. ``fit(train)``: label every training prompt with a task type (the trace's
   own ``task`` field, the keyword matcher, or a trained naive-Bayes
   classifier: ``emoe_task``); build per-task per-layer expert frequency
   profiles f[task] [L, E] (fraction of the task's tokens routed to each
   expert); the expected output length W_o[task] (mean generated tokens);
   and train eMoE-A (below) on the training prompts in prompt-id order.
2. eMoE-A (``SequenceModel``): a per-layer MLP, trained with optax, that maps
   the per-layer expert frequencies of the ``history`` most recent prompts plus
   the task's profile row and a layer one-hot to a correction of the log task
   profile; softmax gives the distribution over the E experts of a coming
   prompt of that task. Trained with soft-label cross
   entropy on (history ending g prompts before the target, target) pairs with
   g drawn from 1..period, because at run time one forecast serves ``period``
   prompts.
3. Every ``period`` prompts (p = 40 by default, counted from the start of the
   replay) eMoE-A is invoked on the latest history and forecasts f[task] for
   every task type; between invocations the forecast is reused. Before any
   history exists the profiles stand in.
4. Eq. 2: the expected token load of expert i at layer l is
   N_i = sum over task types of (sum_j W_j + T * W_o) * s(task, l) * f_i,
   with W_j the prompt lengths of the task's requests, T their number, W_o the
   task's expected output length and s the sensitivity (0 skips the layer;
   loaded from a JSON file, default 1). ``select_experts`` keeps the top
   ``budget`` experts per layer (ties: lower id; only N > 0).
5. As a Predictor: at ``begin_prompt`` the request is the prompt itself, so
   the scores of layer l are N[l] (restricted to the selection when a budget
   is given) for every token; predictions never depend on routing inside the
   prompt. ``end_prompt`` appends the prompt's frequencies to the history.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from emoe_jax.cli import USER_ERRORS, fail
from emoe_jax.predict.base import BasePredictor, Prediction, PromptInfo, PromptPredictions, horizon_rows
from emoe_jax.predict.emoe_selection import EMoEError, expected_load, load_sensitivity, select_experts
from emoe_jax.predict.emoe_task import KeywordTaskMatcher, NaiveBayesTaskClassifier


# -- eMoE-A ---------------------------------------------------------------------


def prompt_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] float64 routing counts of a prompt, from experts [T, L, k]."""
    experts = np.asarray(experts).astype(np.int64)
    counts = np.zeros((experts.shape[1], num_experts), np.float64)
    np.add.at(counts, (np.broadcast_to(np.arange(experts.shape[1])[None, :, None], experts.shape), experts), 1.0)
    return counts


def prompt_frequencies(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] fraction of the prompt's tokens routed to each expert, from experts [T, L, k]."""
    return (prompt_counts(experts, num_experts) / max(np.asarray(experts).shape[0], 1)).astype(np.float32)


class SequenceModel:
    """eMoE-A: per-layer MLP from recent prompts' frequencies (+ task profile) to a coming prompt's."""

    def __init__(self, num_layers: int, num_experts: int, history: int, hidden: int = 128, seed: int = 0) -> None:
        import jax

        self.num_layers, self.num_experts, self.history, self.hidden = num_layers, num_experts, history, hidden
        in_dim = (history + 1) * num_experts + num_layers
        k1, k2 = jax.random.split(jax.random.key(seed))
        self.params = {
            "w1": np.asarray(jax.random.normal(k1, (in_dim, hidden)) / np.sqrt(in_dim), np.float32),
            "b1": np.zeros(hidden, np.float32),
            "w2": np.asarray(jax.random.normal(k2, (hidden, num_experts)) * 0.01, np.float32),
            "b2": np.zeros(num_experts, np.float32),
        }

    def features(self, past: np.ndarray, profile: np.ndarray) -> np.ndarray:
        """[L, in] rows from past [history, L, E] (oldest first) and the task profile [L, E]."""
        layer_onehot = np.eye(self.num_layers, dtype=np.float32)
        return np.concatenate([past.transpose(1, 0, 2).reshape(self.num_layers, -1), profile, layer_onehot], axis=1)

    @staticmethod
    def base_logits(profile: np.ndarray, top_k: int) -> np.ndarray:
        """log of the task profile as a distribution: the forecast before any correction [L, E]."""
        return np.log(np.asarray(profile, np.float64) / top_k + 1e-4).astype(np.float32)

    @staticmethod
    def _logits(params: dict, x, base):
        import jax.numpy as jnp

        # Residual on the task profile: with w2 ~ 0 the forecast starts as the profile
        # and training learns history-dependent corrections.
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return base + h @ params["w2"] + params["b2"]

    def fit(self, x: np.ndarray, base: np.ndarray, y: np.ndarray, steps: int = 300, lr: float = 3e-3,
            batch: int = 1024) -> list[float]:  # fmt: skip
        """Adam on soft-label cross entropy over minibatches; x [N, in], base [N, E] log-profile, y [N, E] (sum 1)."""
        import jax
        import optax

        tx = optax.adam(lr)
        params = {k: jax.numpy.asarray(v) for k, v in self.params.items()}
        state = tx.init(params)

        @jax.jit
        def step(params, state, xb, bb, yb):
            loss, grads = jax.value_and_grad(
                lambda p: optax.softmax_cross_entropy(self._logits(p, xb, bb), yb).mean()
            )(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        rng = np.random.default_rng(0)
        size = min(batch, x.shape[0])
        losses = []
        for _ in range(steps):
            idx = rng.choice(x.shape[0], size, replace=False)
            params, state, loss = step(params, state, x[idx], base[idx], y[idx])
            losses.append(float(loss))
        self.params = {k: np.asarray(v) for k, v in params.items()}
        return losses

    def forecast(self, past: np.ndarray, profile: np.ndarray, top_k: int) -> np.ndarray:
        """Expected expert frequencies [L, E] (rows sum to top_k) of a coming prompt."""
        logits = np.asarray(
            self._logits(self.params, self.features(past, profile), self.base_logits(profile, top_k)), np.float64
        )
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (top_k * p / p.sum(1, keepdims=True)).astype(np.float32)


# -- the predictor --------------------------------------------------------------


class EMoEPredictor(BasePredictor):
    name = "emoe"

    def __init__(
        self,
        lookahead: int = 1,
        period: int = 40,
        history: int = 2,
        task_source: str = "keywords",
        classifier: str | os.PathLike | None = None,
        sensitivity: str | os.PathLike | None = None,
        budget: int | None = None,
        sequence_model: bool = True,
        train_steps: int = 300,
        seed: int = 0,
        eviction: str = "lru",
    ) -> None:
        super().__init__(lookahead=lookahead)
        if period < 1 or history < 1:
            raise EMoEError(f"period and history must be >= 1 prompts, got {period} and {history}")
        if task_source not in ("keywords", "classifier", "trace"):
            raise EMoEError(f"task_source must be keywords, classifier or trace, got {task_source!r}")
        if task_source == "classifier" and classifier is None:
            raise EMoEError("task_source='classifier' needs classifier=PATH (a .npz from train-task-classifier)")
        self.period, self.history, self.budget = int(period), int(history), budget
        self.task_source, self.sequence_model, self.train_steps, self.seed = task_source, sequence_model, train_steps, seed
        self.eviction = eviction
        self.name = "emoe" if sequence_model else "emoe-profiles"
        self.extractor = (
            NaiveBayesTaskClassifier.load(classifier) if task_source == "classifier"
            else KeywordTaskMatcher() if task_source == "keywords" else None
        )  # fmt: skip
        self.sensitivity_path = sensitivity
        self.sensitivity: dict[str, np.ndarray] | None = None
        self.profiles: dict[str, np.ndarray] | None = None  # task -> [L, E]
        self.output_tokens: dict[str, float] = {}
        self.model: SequenceModel | None = None
        self.train_loss: list[float] = []

    def task_of(self, trace_or_info: Any) -> str:
        if self.extractor is None:
            return str(trace_or_info.task)
        return self.extractor.classify(str(trace_or_info.text))

    # -- fitting ------------------------------------------------------------------
    def fit(self, train: Any) -> None:
        meta = train.meta
        L, E, k = int(meta.num_layers), int(meta.num_experts), int(meta.top_k)
        self.top_k = k
        if self.sensitivity_path is not None:
            self.sensitivity = load_sensitivity(self.sensitivity_path, L)
        order = np.argsort(np.asarray(train.prompt_ids), kind="stable")
        prompts = [train[int(i)] for i in order]
        if not prompts:
            raise EMoEError("eMoE needs at least one training prompt")
        tasks = [self.task_of(p) for p in prompts]
        freqs = np.stack([prompt_frequencies(p.experts, E) for p in prompts])  # [P, L, E]
        tokens = np.array([p.experts.shape[0] for p in prompts], np.float64)
        overall = (freqs * tokens[:, None, None]).sum(0) / tokens.sum()
        self.profiles = {"*": overall.astype(np.float32)}
        for task in sorted(set(tasks)):
            sel = np.array([t == task for t in tasks])
            self.profiles[task] = ((freqs[sel] * tokens[sel, None, None]).sum(0) / tokens[sel].sum()).astype(np.float32)
            self.output_tokens[task] = float(np.mean([p.n_tokens - p.n_prefill for p, s in zip(prompts, sel) if s]))
        self._seed_history = deque(freqs[-self.history :], maxlen=self.history)
        if self.sequence_model and len(prompts) > self.history:
            self.model = SequenceModel(L, E, self.history, seed=self.seed)
            x, base, y = self._training_pairs(freqs, tasks)
            self.train_loss = self.model.fit(x, base, y, steps=self.train_steps)
        self.reset_replay()

    def _training_pairs(self, freqs: np.ndarray, tasks: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        xs, bases, ys = [], [], []
        for _ in range(1):  # one draw of the gap per target
            for i in range(self.history, len(freqs)):
                gap = int(rng.integers(1, min(self.period, i - self.history + 1) + 1))
                end = i - gap + 1  # history = prompts end-history .. end-1
                past = freqs[end - self.history : end]  # [m, L, E]
                xs.append(self.model.features(past, self.profiles[tasks[i]]))
                bases.append(self.model.base_logits(self.profiles[tasks[i]], self.top_k))
                ys.append(freqs[i] / self.top_k)
        return np.concatenate(xs), np.concatenate(bases), np.concatenate(ys)

    # -- per prompt ---------------------------------------------------------------
    def _require_fit(self) -> None:
        if self.profiles is None:
            raise RuntimeError(f"predictor {self.name!r} needs training traces: call fit(train) first "
                               "(CLI: --train-traces DIR or --split)")  # fmt: skip

    def reset_replay(self) -> None:
        """Restart the prompt counter and history (as right after fit)."""
        self._count = 0
        self._past = deque(self._seed_history, maxlen=self.history)
        self._forecast: dict[str, np.ndarray] | None = None

    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        self._require_fit()
        if self._count % self.period == 0 and self.model is not None and len(self._past) == self.history:
            # eMoE-A invocation: forecasts are computed lazily per task from this history.
            self._forecast = {}
            self._invocation_past = np.stack(self._past)
        task = self.task_of(info)
        self.current_task = task
        freq = {task: self._forecast_from_invocation(task)}
        load = expected_load(freq, [(task, info.n_prefill)], self.output_tokens.get(task, 0.0), self.sensitivity)
        if self.budget is not None:
            load = np.where(select_experts(load, self.budget), load, 0.0)
        self.scores = load.astype(np.float32)  # [L, E]
        self._cur_counts = np.zeros_like(self.scores, dtype=np.float64)
        self._cur_tokens = 0

    def _forecast_from_invocation(self, task: str) -> np.ndarray:
        profile = self.profiles.get(task, self.profiles["*"])
        if self.model is None or self._forecast is None:
            return profile
        if task not in self._forecast:
            self._forecast[task] = self.model.forecast(self._invocation_past, profile, self.top_k)
        return self._forecast[task]

    def predict(self, t: int, l: int) -> Prediction:
        targets = self.target_list(t, l, self.scores.shape[0])
        return Prediction(targets, self.scores[targets[:, 1]])

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        self._cur_counts[l, np.asarray(experts, np.int64)] += 1.0
        if l == 0:
            self._cur_tokens += 1

    def end_prompt(self) -> None:
        self._past.append((self._cur_counts / max(self._cur_tokens, 1)).astype(np.float32))
        self._count += 1

    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        """Same hooks without per-step calls: the scores do not depend on routing inside the prompt."""
        from emoe_jax.predict.drive import prompt_info

        num_layers = int(meta.num_layers)
        self.begin_prompt(prompt_info(trace, meta))
        experts = np.asarray(trace.experts)  # [T, L, k]
        issue, target = horizon_rows(experts.shape[0] * num_layers, self.lookahead)
        scores = self.scores[target % num_layers]
        self._cur_counts = prompt_counts(experts, self.scores.shape[1])
        self._cur_tokens = experts.shape[0]
        self.end_prompt()
        return PromptPredictions(issue, target, scores)


# -- CLI: python -m emoe_jax.predict.emoe ------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Train the naive-Bayes task classifier on the task-labelled corpus and compare it with keyword matching."""
    import argparse
    import time
    from collections import Counter

    from emoe_jax.predict.emoe_task import CORPUS_KEYWORDS, accuracy, corpus_snippets

    p = argparse.ArgumentParser(
        prog="python -m emoe_jax.predict.emoe",
        description="eMoE task extraction. train-task-classifier: fit a naive-Bayes classifier over character "
        "n-grams on prompt-sized snippets of a task-labelled corpus (python -m emoe_jax.data build) and report "
        "its validation accuracy next to the keyword matcher's. Simulate eMoE itself with "
        "python -m emoe_jax.sim --predictor emoe --split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-task-classifier", help="train and save the classifier",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    t.add_argument("--corpus", type=Path, required=True, help="corpus directory with train.jsonl, validation.jsonl")
    t.add_argument("--out", type=Path, required=True, help=".npz to write (atomically)")
    t.add_argument("--chars", type=int, default=300, help="snippet length in characters")
    t.add_argument("--buckets", type=int, default=1 << 16, help="hashed n-gram buckets")
    t.add_argument("--traces", type=Path, default=None, help="also report the task mix of these traces' prompts")
    t.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        start = time.perf_counter()
        texts, labels = corpus_snippets(args.corpus / "train.jsonl", chars=args.chars)
        clf = NaiveBayesTaskClassifier(buckets=args.buckets).fit(texts, labels)
        fit_s = time.perf_counter() - start
        vt, vl = corpus_snippets(args.corpus / "validation.jsonl", chars=args.chars, seed=1)
        out = {"train_snippets": len(texts), "validation_snippets": len(vt), "fit_seconds": round(fit_s, 2),
               "naive_bayes_accuracy": accuracy(clf, vt, vl),
               "keyword_accuracy": accuracy(KeywordTaskMatcher(CORPUS_KEYWORDS, default="dialogue"), vt, vl),
               "tasks": clf.tasks}  # fmt: skip
        path = clf.save(args.out)
        out["out"], out["bytes"] = str(path), path.stat().st_size
        if args.traces is not None:
            from emoe_jax.traces import TraceSet

            ts = TraceSet.load(args.traces)
            texts = [ts[i].text for i in range(len(ts))]
            out["trace_tasks_naive_bayes"] = dict(Counter(clf.classify(x) for x in texts).most_common())
            out["trace_tasks_keywords"] = dict(Counter(KeywordTaskMatcher().classify(x) for x in texts).most_common())
    except USER_ERRORS as exc:
        return fail(exc)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
