#!/usr/bin/env python3
"""The trainer's data, checkpoints and resumption, on the CPU with a tiny model (plain python3 and
PyTorch, no GPU): the sharded corpus read and verified, windows fixed by (seed, step, shards),
checkpoint parts with their manifest, corrupt or mismatched checkpoints refused naming the fault,
and a run of N steps equal bit for bit (losses and every weight and optimiser moment) to k steps,
a save, a load in a new process, and N - k steps."""
import hashlib
import json
import lzma
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

import checkpoint
import evaluate
import train
from corpus import Corpus, CorpusError, Windows, load_val, make_fake
from fma_model import load_hf

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "..", "tests", "data", "tiny-spm.model")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def fake_corpus(folder, **kw):
    man = make_fake(folder, **kw)
    shutil.copy(TOKENIZER, os.path.join(folder, "tokenizer.model"))
    return man


class ShardedCorpus(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.dir = os.path.join(self.tmp, "c")
        self.man = fake_corpus(self.dir, shards=4, docs_per_shard=10)

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def test_reads_the_shards_present_whole(self):
        c = Corpus(self.dir)
        streams = [np.frombuffer(lzma.decompress(read(os.path.join(self.dir, e["file"]))), "<u2")
                   for e in self.man["shards"]]
        self.assertTrue(np.array_equal(c.tokens, np.concatenate(streams)))
        # Whole documents: BOS first, EOS last, as many as shards.json says.
        self.assertEqual((c.tokens[0], c.tokens[-1]), (1, 2))
        self.assertEqual(int((c.tokens == 1).sum()), sum(e["docs"] for e in self.man["shards"]))
        os.remove(os.path.join(self.dir, "train-002.u16.xz"))  # a shard that did not travel
        part = Corpus(self.dir)
        self.assertEqual(part.shards, ["train-000.u16.xz", "train-001.u16.xz", "train-003.u16.xz"])
        self.assertNotEqual(part.key, c.key)
        val, docs = load_val(self.dir)
        self.assertEqual([val[d["start"]] for d in docs], [1] * len(docs))
        self.assertEqual(sum(d["length"] for d in docs), len(val))

    def test_damaged_shard_refused(self):
        path = os.path.join(self.dir, "train-001.u16.xz")
        blob = bytearray(read(path))
        blob[len(blob) // 2] ^= 1
        write(path, blob)
        with self.assertRaisesRegex(CorpusError, "train-001.u16.xz: sha256 .* does not match"):
            Corpus(self.dir)
        with self.assertRaisesRegex(CorpusError, "vocabulary 512, the model's is 16384"):
            os.remove(path)
            Corpus(self.dir, vocab=16384)

    def test_windows_depend_on_seed_step_and_shards_only(self):
        c = Corpus(self.dir)
        a, b = Windows(c, 7, 4, 64), Windows(c, 7, 4, 64)
        steps = [5, 0, 3, 5]
        first = [a.starts(s) for s in steps]  # in any order, again and again: the same windows
        self.assertTrue(all(np.array_equal(x, b.starts(s)) for x, s in zip(first, steps)))
        self.assertTrue(np.array_equal(first[0], first[3]))
        self.assertFalse(np.array_equal(first[0], first[1]))
        self.assertFalse(np.array_equal(a.starts(5), Windows(c, 8, 4, 64).starts(5)))
        x = a.batch_at(3)
        self.assertEqual(x.shape, (4, 65))
        self.assertTrue(np.array_equal(x[0], c.tokens[a.starts(3)[0]:][:65]))

    def test_legacy_format_draws_the_shipped_recipe_windows(self):
        legacy = os.path.join(self.tmp, "legacy")
        os.makedirs(legacy)
        ids = np.random.default_rng(1).integers(0, 8192, 5000).astype("<u2")
        ids.tofile(os.path.join(legacy, "train.bin"))
        w = Windows(Corpus(legacy), 1, 8, 256)
        old = np.random.default_rng(1)  # train.py before the sharded corpus: one generator
        for step in range(3):
            self.assertTrue(np.array_equal(w.starts(step), old.integers(0, 5000 - 256 - 1, 8)))


class Parts(unittest.TestCase):
    def test_parts_manifest_and_refusals(self):
        with tempfile.TemporaryDirectory() as out:
            state = {"w": torch.randn(1000, 40), "n": 3}  # 160 KB: 11 parts of 15,000 bytes
            saved = checkpoint.PART_BYTES
            checkpoint.PART_BYTES = 15000
            try:
                checkpoint.save(out, {"w": torch.zeros(3)}, {"step": 1})
                folder = checkpoint.save(out, state, {"step": 2})
            finally:
                checkpoint.PART_BYTES = saved
            self.assertEqual(checkpoint.latest(out), folder)
            self.assertEqual(sorted(os.listdir(out)), ["ckpt-0000002", "latest"])  # step 1 gone
            man = json.loads(read(os.path.join(folder, "manifest.json")))
            self.assertGreaterEqual(len(man["parts"]), 11)
            self.assertTrue(all(p["bytes"] <= 15000 for p in man["parts"]))
            _, back = checkpoint.load(folder)
            self.assertTrue(torch.equal(back["w"], state["w"]))
            # Damaged, truncated, missing: each refused, naming the part.
            part = os.path.join(folder, "part-004")
            blob = bytearray(read(part))
            blob[7] ^= 0x10
            write(part, blob)
            with self.assertRaisesRegex(checkpoint.CheckpointError, "part-004 has sha256"):
                checkpoint.load(folder)
            write(part, blob[:100])
            with self.assertRaisesRegex(checkpoint.CheckpointError, "part-004 has 100 bytes"):
                checkpoint.load(folder)
            os.remove(part)
            with self.assertRaisesRegex(checkpoint.CheckpointError, "part-004 is missing"):
                checkpoint.load(folder)

    def test_outbox_batches_fit_a_command(self):
        with tempfile.TemporaryDirectory() as tmp:
            sizes = [15, 15, 15, 15, 1, 15, 0, 0, 0, 0, 0, 0, 0, 0, 3]  # MiB
            files = []
            for i, mib in enumerate(sizes):
                files.append(os.path.join(tmp, f"f{i:02d}"))
                with open(files[-1], "wb") as f:
                    f.truncate(mib * 2**20)
            groups = checkpoint.batches(files)
            self.assertEqual(sum(groups, []), files)
            for g in groups:
                self.assertLessEqual(len(g), 8)
                self.assertLessEqual(sum(os.path.getsize(f) for f in g), 60 * 2**20)
            self.assertEqual([len(g) for g in groups], [4, 8, 3])


def train_command(data, out, *extra, device="cpu"):
    return [sys.executable, os.path.join(HERE, "train.py"), "--data", data, "--out", out,
            "--size", "tiny", "--device", device, "--batch", "4", "--warmup", "2", "--log-every", "1",
            "--plan-steps", "6", *extra]


def run_train(data, out, *extra, device="cpu"):
    """train.py in its own process, as on the GPU machine: nothing carries over but the files."""
    subprocess.run(train_command(data, out, *extra, device=device), check=True, cwd=HERE,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    return latest_state(out)


def latest_state(out):
    _, state = checkpoint.load(checkpoint.latest(out))
    return state


def run_processes(world, data, out, *extra):
    """train.py in `world` processes training one model, as torchrun starts them (gloo here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(train_command(data, out, *extra), cwd=HERE, env=dict(
        os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in range(world)]
    codes = [p.wait(timeout=600) for p in procs]
    if any(codes):
        raise AssertionError(f"train.py processes exited with {codes}")
    return latest_state(out)


class ExactResume(unittest.TestCase):
    def assert_same_run(self, a, b):
        self.assertEqual(a["progress"]["step"], b["progress"]["step"])
        self.assertEqual(a["progress"]["losses"], b["progress"]["losses"])  # floats, exactly
        for k, t in a["model"].items():
            self.assertTrue(torch.equal(t, b["model"][k]), k)
        for k, st in a["opt"]["state"].items():
            for name, t in st.items():
                self.assertTrue(torch.equal(t, b["opt"]["state"][k][name]), (k, name))
        self.assertEqual(a["data"]["next_step"], b["data"]["next_step"])

    def check(self, tmp, data, *extra, k=3):
        """Trains 6 steps in one run and in two (k, then the rest): the same, bit for bit."""
        whole = run_train(data, os.path.join(tmp, "whole"), *extra)
        split = os.path.join(tmp, "split")
        first = run_train(data, split, "--stop-at", str(k), *extra)
        self.assertEqual(first["progress"]["step"], k)
        resumed = run_train(data, split, *extra)
        self.assert_same_run(whole, resumed)
        self.assertEqual(len(whole["progress"]["losses"]), 6)
        self.assertNotEqual(whole["progress"]["losses"][0], whole["progress"]["losses"][-1])
        self.assertTrue(os.path.exists(os.path.join(split, "hf", "model.safetensors")))
        return split

    def test_sharded_with_micro_batches(self):
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "c")
            fake_corpus(data, shards=3, docs_per_shard=12)
            split = self.check(tmp, data, "--micro-batch", "2", "--rotary-summaries",
                                      "--ranks", "2,4,4")
            # A resumed run must be the same model and plan; it names what differs.
            with self.assertRaisesRegex(checkpoint.CheckpointError, r"another plan: lr 0\.002 there"):
                train.main(["--data", data, "--out", split, "--size", "tiny", "--device", "cpu",
                            "--batch", "4", "--warmup", "2", "--rotary-summaries", "--ranks",
                            "2,4,4", "--lr", "1e-3", "--minutes", "0"])
            with self.assertRaisesRegex(checkpoint.CheckpointError, r"another model: fma_rank 4 there, 2"):
                train.main(["--data", data, "--out", split, "--size", "tiny", "--device", "cpu",
                            "--batch", "4", "--warmup", "2", "--rotary-summaries", "--minutes", "0"])
            with open(os.path.join(split, "latest")) as f:
                part = os.path.join(split, f.read().strip(), "part-000")
            with open(part, "r+b") as f:
                f.seek(100)
                f.write(b"\0")
            with self.assertRaisesRegex(checkpoint.CheckpointError, "part-000 has sha256"):
                train.main(["--data", data, "--out", split, "--size", "tiny", "--device", "cpu",
                            "--batch", "4", "--warmup", "2", "--minutes", "0"])

    def test_a_checkpoint_exported_before_the_plan_ends(self):
        """--export writes a run's latest checkpoint (or a named one) as the bf16 folder a
        finished run would: the checkpoint's weights, rounded to bf16, and what load_hf reads."""
        with tempfile.TemporaryDirectory() as tmp:
            data, run = os.path.join(tmp, "c"), os.path.join(tmp, "run")
            fake_corpus(data, shards=2, docs_per_shard=8)
            state = run_train(data, run, "--stop-at", "2")
            self.assertFalse(os.path.exists(os.path.join(run, "hf")))  # the plan is not done
            for source in (run, checkpoint.latest(run)):
                out = os.path.join(tmp, "hf_" + os.path.basename(source))
                train.main(["--export", source, "--out", out, "--data", data])
                model, _ = load_hf(out)
                got = model.state_dict()
                self.assertEqual(set(got), set(state["model"]))
                for k, t in state["model"].items():
                    self.assertTrue(torch.equal(got[k], t.to(torch.bfloat16).float()), k)
            with self.assertRaises(checkpoint.CheckpointError):
                train.main(["--export", data, "--out", os.path.join(tmp, "x"), "--data", data])

    def test_legacy_format(self):
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "legacy")
            os.makedirs(data)
            np.random.default_rng(2).integers(3, 8192, 20000).astype("<u2").tofile(
                os.path.join(data, "train.bin"))
            shutil.copy(TOKENIZER, os.path.join(data, "tokenizer.model"))
            self.check(tmp, data, k=2)


class FlashAttention(unittest.TestCase):
    def test_training_through_flash_follows_gather(self):
        """--fma-attention flash (one causal attention call a fine block) trains as the default
        gather path does: the first step's loss the same to float32 rounding (1e-6), the later
        ones within 1e-4 (Adam spreads the rounding of the two summation orders), and the run
        says it used flash (CPU; the FlashAttention kernel is checked by FlashOnTheGpu)."""
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "c")
            fake_corpus(data, shards=2, docs_per_shard=12)
            runs = [run_train(data, os.path.join(tmp, k), "--fma-attention", k, "--ranks", "2,4,4")
                    for k in ("gather", "flash")]
            gather, flash = (r["progress"]["losses"] for r in runs)  # [step, loss] each
            self.assertEqual(len(gather), 6)
            # The first step's loss is the same weights' forward; Adam spreads rounding after it.
            self.assertAlmostEqual(gather[0][1], flash[0][1], delta=1e-6 * gather[0][1])
            for (step, a), (step_b, b) in zip(gather, flash):
                self.assertEqual(step, step_b)
                self.assertAlmostEqual(a, b, delta=1e-4 * abs(a))
            with open(os.path.join(tmp, "flash", "train.log")) as f:
                self.assertIn("FMA attention: flash", f.read())


class SeveralProcesses(unittest.TestCase):
    def test_two_processes_follow_one(self):
        """Two processes, each with half of every step's windows and their gradients averaged,
        train as one process does with micro-batches of that half (to fp32 rounding: the same
        micro-batches, summed in another order), only the first writes, and a run stopped and
        resumed by two new processes is the same run, bit for bit."""
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "c")
            fake_corpus(data, shards=2, docs_per_shard=12)
            opts = ("--rotary-summaries", "--micro-batch", "2")
            one = run_train(data, os.path.join(tmp, "one"), *opts)
            two = run_processes(2, data, os.path.join(tmp, "two"), *opts)
            self.assertEqual(two["progress"]["tokens"], one["progress"]["tokens"])
            self.assertEqual(len(two["progress"]["losses"]), 6)
            for (s1, a), (s2, b) in zip(one["progress"]["losses"], two["progress"]["losses"]):
                self.assertEqual(s1, s2)
                self.assertLess(abs(a - b), 1e-5 * abs(a))
            for k, t in one["model"].items():
                diff = (t.float() - two["model"][k].float()).norm() / t.float().norm()
                self.assertLess(diff.item(), 1e-5, k)
            self.assertNotEqual(one["progress"]["losses"][0], one["progress"]["losses"][-1])
            with open(os.path.join(tmp, "two", "train.log")) as f:
                log = f.read()
            self.assertEqual(log.count("2 processes"), 1)  # one writer
            self.assertTrue(os.path.exists(os.path.join(tmp, "two", "hf", "model.safetensors")))
            # Stopped at step 3 and resumed by two new processes: the same run.
            run_processes(2, data, os.path.join(tmp, "resumed"), *opts, "--stop-at", "3")
            resumed = run_processes(2, data, os.path.join(tmp, "resumed"), *opts)
            self.assertEqual(resumed["progress"]["losses"], two["progress"]["losses"])
            for k, t in two["model"].items():
                self.assertTrue(torch.equal(t, resumed["model"][k]), k)


@unittest.skipUnless(torch.cuda.is_available(), "no GPU")
class OnTheGpu(unittest.TestCase):
    def test_resumed_and_compiled_runs_follow_the_whole_run(self):
        """CUDA, bf16 autocast, fused AdamW: 3 steps, a checkpoint, a new process, 3 more steps
        follow 6 steps in one run to bf16 rounding (GPU training is not bit-reproducible: atomics
        in the backward pass), and so do a run with torch.compile (or its eager fallback) and one
        replayed as CUDA graphs (--cuda-graphs: the whole batch in one micro-batch)."""
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "c")
            fake_corpus(data, shards=3, docs_per_shard=12)
            opts = ("--rotary-summaries", "--ranks", "2,4,4", "--micro-batch", "2")
            whole = run_train(data, os.path.join(tmp, "whole"), *opts, device="cuda")
            run_train(data, os.path.join(tmp, "split"), *opts, "--stop-at", "3", device="cuda")
            split = run_train(data, os.path.join(tmp, "split"), *opts, device="cuda")
            compiled = run_train(data, os.path.join(tmp, "compiled"), *opts, "--compile",
                                 device="cuda")
            graphs = run_train(data, os.path.join(tmp, "graphs"), *opts[:-2], "--compile",
                               "--cuda-graphs", device="cuda")
            losses = [[loss for _, loss in r["progress"]["losses"]]
                      for r in (whole, split, compiled, graphs)]
            print("losses, whole / resumed / compiled / CUDA graphs:", losses)
            for other in losses[1:]:
                self.assertEqual(len(other), 6)
                for a, b in zip(losses[0], other):
                    self.assertLess(abs(a - b), 2e-2 * abs(a))
            self.assertLess(losses[0][-1], losses[0][0])  # it learns
            for k, t in whole["model"].items():
                diff = (t.float() - split["model"][k].float()).norm() / t.float().norm()
                self.assertLess(diff.item(), 2e-2, k)


class Evaluation(unittest.TestCase):
    def test_batched_windows_score_as_one_at_a_time(self):
        """evaluate.py's windows, batched, against each window through the model alone."""
        torch.manual_seed(0)
        model = train.FmaModel(train.model_config(False, "tiny")).eval()
        ids = np.random.default_rng(1).integers(3, 500, 1000)
        for ctx in (256, 1000, 300):  # whole windows only, one, and a short last window
            got = evaluate.nll_windows(model, ids, ctx, "cpu", False)
            with torch.no_grad():
                want = torch.cat([model.nll(torch.from_numpy(ids[s:s + ctx])[None])[0]
                                  for s in range(0, len(ids) - 1, ctx)])
            self.assertEqual(got.shape, want.shape)
            self.assertLess((got - want).abs().max().item(), 1e-5)

    def test_same_text_buckets_score_as_one_window_at_a_time(self):
        """by_position_same_text, its windows batched, against the windows one at a time."""
        torch.manual_seed(0)
        model = train.FmaModel(train.model_config(False, "tiny")).eval()
        val = np.random.default_rng(2).integers(3, 500, 1400)
        docs = [{"start": 0, "length": 600}, {"start": 600, "length": 200},  # the second: short
                {"start": 800, "length": 540}]  # its last windows are cut short
        n, step = 256, 64
        got = evaluate.by_position_same_text(model, val, docs, "cpu", False, n, step)
        sums, counts = np.zeros(2), np.zeros(2)  # buckets 0-128, 128-256 (the context)
        for d in (docs[0], docs[2]):
            for s in range(step, 2 * n, step):
                ids = val[d["start"] + s:d["start"] + min(s + n, d["length"])]
                with torch.no_grad():
                    nll = model.nll(torch.from_numpy(ids)[None])[0].numpy()
                for i, x in enumerate(nll):  # token s + 1 + i, with i tokens before it
                    if n <= s + 1 + i < 2 * n:
                        sums[int(i >= 128)] += x
                        counts[int(i >= 128)] += 1
        self.assertEqual(got["same_text_docs"], 2)
        first = evaluate.by_position_same_text(model, val, docs, "cpu", False, n, step, max_docs=1)
        self.assertEqual(first, evaluate.by_position_same_text(model, val, docs[:1], "cpu", False,
                                                               n, step))
        self.assertEqual(first["same_text_docs"], 1)
        want = {"0-128": np.exp(sums[0] / counts[0]), "128-256": np.exp(sums[1] / counts[1])}
        self.assertEqual(list(got["ppl_by_position_same_text"]), list(want))
        for k, v in want.items():
            self.assertLess(abs(got["ppl_by_position_same_text"][k] / v - 1), 1e-6, k)


class Profile(unittest.TestCase):
    def test_benchmark_writes_each_models_operator_table(self):
        """--profile: a table per model and micro-batch whose rows are the step's operators, the
        matrix products among them, by their own time."""
        with tempfile.TemporaryDirectory() as d:
            train.main(["--benchmark-steps", "1", "--size", "tiny", "--batch", "2", "--device", "cpu",
                        "--benchmark-micro", "1,2", "--profile", d])
            self.assertEqual(sorted(os.listdir(d)),
                             ["exact-mb1.txt", "exact-mb2.txt", "fma-mb1.txt", "fma-mb2.txt"])
            for name in os.listdir(d):
                with open(os.path.join(d, name)) as f:
                    lines = f.read().split("\n")
                self.assertEqual(lines[0], "2 steps of 2 windows, sorted by self_cpu_time_total")
                self.assertTrue(any(l.strip().startswith("aten::mm ") for l in lines), name)
                self.assertGreater(sum(l.strip().startswith("aten::") for l in lines), 10, name)
        with self.assertRaises(SystemExit):
            train.main(["--size", "tiny", "--device", "cpu", "--profile", "x"])


def run_lease(d, minutes, path_first, corpus=None, **env):
    """One call of gpu_lease.sh from the repository root, without its tests: the carried folder
    (default d/carried; a shards.json beside what is there already), OUT d/out, `path_first`
    ahead on PATH, no GPU chosen beforehand."""
    corpus = corpus or os.path.join(d, "carried")
    os.makedirs(corpus, exist_ok=True)
    write(os.path.join(corpus, "shards.json"), b"{}")
    env = dict(os.environ, TESTS="0", **env, PATH=path_first + os.pathsep + os.environ["PATH"])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(
        ["bash", "tools/train/gpu_lease.sh", corpus, os.path.join(d, "out"), minutes],
        cwd=os.path.join(HERE, "..", ".."), capture_output=True, text=True, timeout=120, env=env)


class LeaseOnAFreshMachine(unittest.TestCase):
    """gpu_lease.sh's later calls fail at once, naming the cause, when the machine that held the
    lease's shards and runs went back (session 13 waited 8 minutes of device time for a run that
    was no longer there), and still wait for a run that is going."""

    def lease(self, d, **env):
        return run_lease(d, "0", os.path.dirname(sys.executable), MODELS="fma", RESUME="1", **env)

    def test_resume_without_the_lease_folder(self):
        with tempfile.TemporaryDirectory() as d:
            got = self.lease(d, LEASE_DIR=os.path.join(d, "lease"))
            self.assertEqual(got.returncode, 3, got.stderr)
            self.assertIn("fresh one", got.stderr)
            self.assertFalse(os.path.exists(os.path.join(d, "lease")))

    def test_waiting_for_a_run_that_is_not_there(self):
        with tempfile.TemporaryDirectory() as d:
            lease = os.path.join(d, "lease")
            os.makedirs(os.path.join(lease, "fma"))
            got = self.lease(d, LEASE_DIR=lease, DETACH="1", WAIT="5")
            self.assertEqual(got.returncode, 3, got.stderr)
            self.assertIn("no run of fma is going here", got.stderr)
            # A live run (its pid alive, no exit code yet) is waited for; once it ends with 0
            # the call goes on (nothing to fetch: no model was written).
            sleeper = subprocess.Popen(["sleep", "2"])
            write(os.path.join(lease, "fma", "pid"), str(sleeper.pid).encode())
            got = self.lease(d, LEASE_DIR=lease, DETACH="1", WAIT="0")
            sleeper.wait()
            self.assertEqual(got.returncode, 0, got.stderr)
            self.assertIn("1 run(s) still going", got.stdout)
            write(os.path.join(lease, "fma", "exit"), b"0\n")
            got = self.lease(d, LEASE_DIR=lease, DETACH="1", WAIT="0")
            self.assertEqual(got.returncode, 0, got.stderr)
            self.assertIn("nothing to fetch yet", got.stdout)

    def test_a_new_run_on_the_shards_already_here(self):
        """CORPUS may be the lease's own corpus folder (a further proxy run on the shards of the
        earlier calls): session 27's call failed at copying each file onto itself, and its wait
        loop then held the GPU 440 s for a run that never started."""
        with tempfile.TemporaryDirectory() as d:
            lease = os.path.join(d, "lease")
            os.makedirs(os.path.join(lease, "corpus"))
            write(os.path.join(lease, "corpus", "train-000.u16.xz"), b"shard")
            got = self.lease(d, LEASE_DIR=lease, corpus=os.path.join(lease, "corpus"))
            self.assertEqual(got.returncode, 0, got.stderr)
            self.assertIn("corpus: 1 training shards present", got.stdout)
            with open(os.path.join(lease, "corpus", "train-000.u16.xz"), "rb") as f:
                self.assertEqual(f.read(), b"shard")

    def test_a_checkpoint_carried_in_over_two_calls(self):
        """INBOX (a path relative to the repository root, as the device tool's carry gives it)
        brings a checkpoint's parts in over several calls: it becomes the run's latest only once
        whole. Session 24 found the relative path resolved after the script's cd: nothing came in."""
        with tempfile.TemporaryDirectory() as d:
            made = os.path.join(d, "made")
            state = {"w": torch.from_numpy(np.random.default_rng(0).random(2 * 2**20 + 9))}
            folder = checkpoint.save(made, state, {"step": 12})
            parts = sorted(f for f in os.listdir(folder) if f.startswith("part-"))
            self.assertEqual(len(parts), 2)
            root = os.path.join(HERE, "..", "..")
            lease = os.path.join(d, "lease")
            os.makedirs(os.path.join(lease, "fma"))
            for i, part in enumerate(parts):
                inbox = os.path.join(d, f"call{i}", "fma_ckpt")
                os.makedirs(inbox)
                for f in ("manifest.json", part):
                    shutil.copy(os.path.join(folder, f), inbox)
                got = self.lease(d, LEASE_DIR=lease, INBOX=os.path.relpath(os.path.dirname(inbox), root))
                self.assertEqual(got.returncode, 0, got.stderr)
                whole = i == len(parts) - 1
                self.assertEqual("checkpoint incomplete" in got.stdout, not whole, got.stdout)
            self.assertEqual(checkpoint.latest(os.path.join(lease, "fma")),
                             os.path.join(lease, "fma", "ckpt-0000012"))
            self.assertEqual(checkpoint.problems(os.path.join(lease, "fma", "ckpt-0000012")), [])

    def ended_run(self, d, converter):
        """A lease whose FMA run ended with its bf16 folder (16 MiB of weights), `converter` the
        bundle's multipole-convert; two calls of it with GPU_BUNDLE. Returns the last."""
        lease, bundle = os.path.join(d, "lease"), os.path.join(d, "bundle")
        hf = os.path.join(lease, "fma", "hf")
        os.makedirs(hf)
        os.makedirs(os.path.join(bundle, "bin"))
        write(os.path.join(lease, "fma", "exit"), b"0\n")
        write(os.path.join(hf, "config.json"), b"{}")
        write(os.path.join(hf, "model.safetensors"), os.urandom(16 * 2**20 + 123))
        carried = os.path.join(d, "carried")
        os.makedirs(carried)
        write(os.path.join(carried, "tokenizer.model"), os.urandom(1000))
        convert = os.path.join(bundle, "bin", "multipole-convert")
        write(convert, converter)
        os.chmod(convert, 0o755)
        for _ in range(2):
            got = self.lease(d, LEASE_DIR=lease, DETACH="1", WAIT="0", GPU_BUNDLE=bundle)
            self.assertEqual(got.returncode, 0, got.stderr)
        return got

    def test_the_ended_runs_shipped_file_comes_back_first(self):
        """With GPU_BUNDLE, the call that sees a run end brings back its Q8_0 GGUF (converted
        once, in 15 MiB parts with its sha256) ahead of the bf16 folder and the checkpoint."""
        with tempfile.TemporaryDirectory() as d:
            # The converter's stand-in: its output depends on every input file; it counts its runs.
            got = self.ended_run(d, b'#!/bin/sh\n[ "$4" = q8_0 ] || exit 9\necho run >> "$0.runs"\n'
                                 b'cat "$1/model.safetensors" "$1/tokenizer.model" "$1/config.json"'
                                 b' > "$2"\n')
            shipped = os.path.join(d, "out", "fma_q8_0")
            parts = sorted(f for f in os.listdir(shipped) if ".part" in f)
            self.assertEqual(parts, ["q8_0.gguf.part00", "q8_0.gguf.part01"])
            data = b"".join(open(os.path.join(shipped, f), "rb").read() for f in parts)
            with open(os.path.join(d, "lease", "fma", "hf", "model.safetensors"), "rb") as f:
                weights = f.read()
            with open(os.path.join(d, "carried", "tokenizer.model"), "rb") as f:
                self.assertEqual(data, weights + f.read() + b"{}")
            with open(os.path.join(shipped, "q8_0.gguf.sha256")) as f:
                self.assertEqual(f.read().split(), [hashlib.sha256(data).hexdigest(), "q8_0.gguf"])
            with open(os.path.join(d, "bundle", "bin", "multipole-convert.runs")) as f:
                self.assertEqual(f.read(), "run\n")
            self.assertIn("outbox: batch 0 of 1", got.stdout)

    def test_a_failed_conversion_leaves_the_bf16_folder(self):
        with tempfile.TemporaryDirectory() as d:
            got = self.ended_run(d, b"#!/bin/sh\necho cannot >&2\nexit 1\n")
            self.assertIn("the Q8_0 conversion failed", got.stderr)
            self.assertFalse(os.path.exists(os.path.join(d, "out", "fma_q8_0")))
            self.assertEqual(sorted(os.listdir(os.path.join(d, "out", "fma_hf"))),
                             ["config.json", "model.safetensors.part00",
                              "model.safetensors.part01"])


class LeaseGpus(unittest.TestCase):
    """gpu_lease.sh gives each model GPUS GPUs of its own where the machine has them all (the FMA
    model and its twin at once on four), else runs them on the same ones at half the batch."""

    def launches(self, gpus_on_machine, models, gpus, **env):
        with tempfile.TemporaryDirectory() as d:
            stubs, record = os.path.join(d, "stubs"), os.path.join(d, "launches")
            os.makedirs(stubs)
            smi = "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i})'\n"
                          for i in range(gpus_on_machine))
            write(os.path.join(stubs, "nvidia-smi"), f"#!/bin/sh\n{smi}".encode())
            # train.py is recorded, not run; everything else is the real Python.
            write(os.path.join(stubs, "python3"), (
                f'#!/bin/sh\nif [ "$1" = train.py ]; then\n'
                f'  echo "$CUDA_VISIBLE_DEVICES|$RANK|$WORLD_SIZE|$MASTER_PORT|$*" >> {record}\n'
                f'  exit 0\nfi\nexec {sys.executable} "$@"\n').encode())
            for f in os.listdir(stubs):
                os.chmod(os.path.join(stubs, f), 0o755)
            got = run_lease(d, "1", stubs, MODELS=models, GPUS=str(gpus),
                            LEASE_DIR=os.path.join(d, "lease"), **env)
            self.assertEqual(got.returncode, 0, got.stderr)
            with open(record) as f:
                rows = [line.rstrip("\n").split("|") for line in f]
        # per model (its --out's last part): sorted (devices, rank, world, port, micro-batch,
        # the arguments after --exact's place)
        by = {}
        for devices, rank, world, port, args in rows:
            a = args.split()
            model = os.path.basename(a[a.index("--out") + 1])
            self.assertEqual("--exact" in a, model.startswith("exact"))
            by.setdefault(model, []).append(
                (devices, int(rank), int(world), port, a[a.index("--micro-batch") + 1],
                 " ".join(a[a.index("--final") + 1:])))
        return {m: sorted(v) for m, v in by.items()}

    def test_each_model_on_gpus_of_its_own(self):
        got = self.launches(4, "fma exact", 2)
        self.assertEqual([r[:3] for r in got["fma"]], [("0,1", 0, 2), ("0,1", 1, 2)])
        self.assertEqual([r[:3] for r in got["exact"]], [("2,3", 0, 2), ("2,3", 1, 2)])
        self.assertEqual({r[4] for r in got["fma"] + got["exact"]}, {"0"})  # the largest micro-batch
        self.assertNotEqual(got["fma"][0][3], got["exact"][0][3])  # ports

    def test_variants_spread_over_the_gpus(self):
        """Proxy runs: fma_TAG and exact_TAG each with its own lease folder and ARGS_TAG, one
        process each, model i on GPU i mod 2, side by side at half the batch."""
        got = self.launches(2, "fma fma_ap exact_small", 1,
                            ARGS_fma_ap="--downsampling attnpool", ARGS_exact_small="--rank 1")
        self.assertEqual({m: [r[0] for r in v] for m, v in got.items()},
                         {"fma": ["0"], "fma_ap": ["1"], "exact_small": ["0"]})
        self.assertEqual({r[4] for v in got.values() for r in v}, {"8"})
        self.assertTrue(got["fma_ap"][0][5].endswith("--downsampling attnpool"))
        self.assertNotIn("attnpool", got["fma"][0][5] + got["exact_small"][0][5])
        self.assertTrue(got["exact_small"][0][5].endswith("--exact --rank 1"))
        with tempfile.TemporaryDirectory() as d:
            bad = run_lease(d, "1", "/nonexistent", MODELS="fma twin")
        self.assertEqual(bad.returncode, 2)
        self.assertIn("fma_TAG", bad.stderr)

    def test_sharing_when_the_machine_has_too_few(self):
        got = self.launches(2, "fma exact", 2)
        self.assertEqual([r[:3] for r in got["fma"]], [("", 0, 2), ("", 1, 2)])
        self.assertEqual({r[4] for r in got["fma"] + got["exact"]}, {"8"})
        got = self.launches(2, "fma", 2)
        self.assertEqual([r[:3] for r in got["fma"]], [("", 0, 2), ("", 1, 2)])
        self.assertEqual(got["fma"][0][4], "0")


class ProxyTable(unittest.TestCase):
    def test_rows_and_gain(self):
        """proxy_table.py: a row per model, the context gain from the same-text buckets."""
        import proxy_table
        res = {"ppl_ctx512": 9.5, "ppl_ctx8192": 8.25, "ppl_by_position_same_text":
               {"512-1024": 8.0, "2048-4096": 7.5, "4096-8192": 7.0}}
        self.assertAlmostEqual(proxy_table.context_gain(res), 0.125)
        lines = proxy_table.table([("exact", res)])
        self.assertEqual(lines[2], "| exact | 9.500 | 8.250 | 8.000 | 7.000 | 12.50 % |")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "e.json")
            write(path, json.dumps(res).encode())
            out = subprocess.run([sys.executable, os.path.join(HERE, "proxy_table.py"),
                                  f"exact={path}", f"again={path}"],
                                 capture_output=True, text=True, check=True).stdout
        self.assertEqual(len(out.splitlines()), 4)

    def test_evaluations_spread_over_the_gpus(self):
        """proxy_evals_gpu.sh: evaluate.py on every model at once, model i on GPU i mod 2, the
        table over those that finished; a failed one named, the call failing."""
        res = {"ppl_ctx512": 9.5, "ppl_ctx8192": 8.25, "ppl_by_position_same_text":
               {"512-1024": 8.0, "4096-8192": 7.0}}
        with tempfile.TemporaryDirectory() as d:
            stubs, record = os.path.join(d, "stubs"), os.path.join(d, "runs")
            os.makedirs(stubs)
            write(os.path.join(stubs, "nvidia-smi"),
                  b"#!/bin/sh\necho 'GPU 0: H200'\necho 'GPU 1: H200'\n")
            # evaluate.py writes a result, except for the model "broken"; the rest is Python.
            write(os.path.join(stubs, "python3"), (
                f'#!/bin/sh\nif [ "$1" = evaluate.py ]; then\n'
                f'  echo "$CUDA_VISIBLE_DEVICES $2 $(echo "$@" | grep -c -- --no-whole-docs)"'
                f' >> {record}\n'
                f'  case $2 in */broken/hf) exit 1 ;; esac\n'
                f"  echo '{json.dumps(res)}' > $4; exit 0\nfi\nexec {sys.executable} \"$@\"\n"
            ).encode())
            for f in os.listdir(stubs):
                os.chmod(os.path.join(stubs, f), 0o755)
            env = dict(os.environ, LEASE_DIR="/lease",
                       PATH=stubs + os.pathsep + os.environ["PATH"])
            got = subprocess.run(
                ["bash", "tools/train/proxy_evals_gpu.sh", d, os.path.join(d, "out"), "fma",
                 "fma_ap", "broken"], cwd=os.path.join(HERE, "..", ".."), capture_output=True,
                text=True, timeout=60, env=env)
            with open(record) as f:
                runs = sorted(line.split() for line in f)
        self.assertEqual(got.returncode, 1, got.stderr)
        self.assertIn("failed on broken", got.stderr)
        self.assertEqual(runs, [["0", "/lease/broken/hf", "1"], ["0", "/lease/fma/hf", "1"],
                                ["1", "/lease/fma_ap/hf", "1"]])
        self.assertEqual([l.split(" |")[0] for l in got.stdout.splitlines()[2:]],
                         ["| fma", "| fma_ap"])


class FullModel(unittest.TestCase):
    def test_size_and_summaries(self):
        """The 30-50M model of issue 12: the summary options MODEL.md measured best."""
        fma, exact = train.model_config(False, "full"), train.model_config(True, "full")
        counts = train.parameter_counts(train.FmaModel(fma))
        self.assertTrue(30e6 <= sum(counts.values()) <= 50e6, counts)
        self.assertEqual((fma.vocab_size, fma.max_position_embeddings, fma.fma_block_size),
                         (16384, 8192, 64))
        self.assertEqual((fma.fma_ranks, fma.fma_rotary_summaries), ([2, 2, 2, 4, 4, 4], True))
        wide = train.model_config(False, "full", ranks=[2, 2, 4, 4, 4], block_size=128)
        self.assertEqual((wide.fma_block_size, wide.levels), (128, 5))  # a proxy run's fine window
        twin = train.parameter_counts(train.FmaModel(exact))
        self.assertEqual(twin["downsampling"], 0)
        self.assertEqual((twin["transformer"], twin["embeddings"]),
                         (counts["transformer"], counts["embeddings"]))


if __name__ == "__main__":
    unittest.main()
