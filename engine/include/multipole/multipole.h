// Multipole: an inference engine for Fast Multipole Attention (FMA) language models.
// The one public header of the library. See docs/ and ../shared/DESIGN.md for the semantics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace mp {

// Every failure the library reports on bad input (files, configs, requests) is an mp::Error
// whose message names the problem.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Downsampling { GroupedConv, Conv, AvgPool };
std::string_view to_string(Downsampling d);
Downsampling parse_downsampling(std::string_view s);  // "groupedconv" | "conv" | "avgpool"

// Q8_0: GGUF's (GGML type 8) blocks of 32 int8 with one fp16 scale, 34 bytes a block, along
// the innermost dimension.
enum class DType { F32, F16, BF16, Q8_0 };
std::string_view to_string(DType t);
DType parse_dtype(std::string_view s);  // "f32" | "f16" | "bf16" | "q8_0"
// Bytes of `numel` elements (Q8_0: numel must be whole blocks of 32; throws Error otherwise).
size_t dtype_bytes(DType t, int64_t numel);

struct Config {
  static constexpr int kMaxLayers = 512;
  int vocab_size = 0;
  int hidden_size = 0;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int intermediate_size = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  // Linear RoPE scaling (Hugging Face rope_scaling {"type": "linear", "factor": f}): positions
  // are divided by f before the rotation. 1: none.
  float rope_linear_factor = 1.0f;
  bool tie_word_embeddings = false;
  int64_t n_ctx_train = 0;  // n, the trained length
  // FMA
  bool fma_enabled = true;
  int fma_block_size = 0;  // m
  int fma_rank = 0;        // p: the largest of the levels' ranks (the cache's stride)
  // Per-level ranks p_l (index level-1, docs/MODEL.md "Per-level ranks"); empty: fma_rank at
  // every level. Files without them: empty.
  std::vector<int> fma_level_ranks;
  Downsampling fma_downsampling = Downsampling::GroupedConv;
  bool fma_scale_attn = true;
  // Rotary key summaries (docs/MODEL.md, "Rotary key summaries"): a groupedconv key summary
  // weighs each RoPE pair (c, c + d/2) by one complex number per tap, so that it rotates with
  // its keys and its score against a query depends on relative positions only. No key bias.
  // avgpool's summaries have that property already; conv's cannot. Files without the key: off.
  bool fma_rotary_summaries = false;
  // Tokens
  int bos_token_id = 1;
  int eos_token_id = 2;
  bool add_bos = true;

  int n_levels() const;             // L = log2(n/m) - 1 (0 in exact mode)
  int group_size(int level) const;  // w_l = m * 2^(l-1), level 1..L
  int rank(int level) const;        // p_l, level 1..L
  void validate() const;            // throws Error naming the first bad field
  std::string summary() const;      // one line for logs
};

// --- Model file -----------------------------------------------------------------------------

// A view of one tensor in the mmap-ed model file. dims[0] is the outermost (row-major).
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t numel() const;
  size_t nbytes() const { return dtype_bytes(dtype, numel()); }
  std::vector<float> to_f32() const;  // Q8_0: dequantized
};

class Tokenizer;
class MappedFile;  // engine/src/file_io.h

// How a sequence samples its tokens (the samplers are under "Sampling" below).
struct SamplingParams {
  float temperature = 0.8f;         // 0: greedy
  int top_k = 40;                   // <= 0: off
  float top_p = 0.95f;              // 1: off
  float min_p = 0.05f;              // 0: off
  float repetition_penalty = 1.0f;  // CTRL-style, 1: off
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int penalty_last_n = 64;  // window the penalties look at; -1: all
  uint64_t seed = 0;
  void validate() const;
};

// A model's recommended sampling: the GGUF keys general.sampling.temp, .top_k, .top_p, .min_p,
// .penalty_repeat and .penalty_last_n (llama.cpp's, which it applies the same way), each
// optional. The tools and the server start from it; an option the user gives or a field a
// request sets replaces it. multipole-convert takes it from a Hugging Face folder's
// generation_config.json, keeps it from a GGUF source, and sets it with --sampling.
struct SamplingRecommendation {
  std::optional<float> temperature, top_p, min_p, repetition_penalty;
  std::optional<int> top_k, penalty_last_n;

  // `base` with every recommended field replaced.
  SamplingParams over(SamplingParams base) const;
  // Each field that `other` has replaces this one's.
  void merge(const SamplingRecommendation& other);
  // "temp 0.8, top_k 0, ..." (the GGUF keys' names) for logs; "none" when empty.
  std::string describe() const;
};

// A loaded model: config, tokenizer and the tensors of a GGUF file (mmap-ed, not copied).
class Model {
 public:
  static std::shared_ptr<Model> load(const std::string& gguf_path);
  ~Model();
  const Config& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // Throws Error if the tensor is absent or its shape differs.
  const TensorView& tensor(const std::string& name, const std::vector<int64_t>& shape) const;
  const std::vector<TensorView>& tensors() const { return tensors_; }
  const std::string& path() const { return path_; }
  // The GGUF's tokenizer.chat_template (Jinja source), empty when the file has none.
  const std::string& chat_template() const { return chat_template_; }
  // The GGUF's general.sampling.* keys (empty when the file has none).
  const SamplingRecommendation& recommended_sampling() const { return sampling_; }
  // A hash of the config, the tensors' names and shapes, and samples of every tensor's bytes:
  // states saved under one model are refused by another (sessions).
  const std::string& identity() const { return identity_; }

 private:
  Model() = default;
  std::unique_ptr<MappedFile> mapping_;
  std::string path_;
  std::string chat_template_;
  SamplingRecommendation sampling_;
  std::string identity_;
  Config config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<TensorView> tensors_;
};

// Names of the engine-side (GGUF) tensors, llama.cpp style.
namespace tensor_names {
std::string token_embd();
std::string output_norm();
std::string output();
std::string layer(int layer, std::string_view what);             // blk.N.<what>.weight
std::string fma_down(int layer, char kv, int level, bool bias);  // blk.N.fma_{k,v}_down.<l-1>.*
}  // namespace tensor_names

// Every tensor a model with this config has, in file order: its GGUF name, its name in a
// Hugging Face checkpoint, and its shape.
struct TensorSpec {
  std::string name;
  std::string hf_name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> expected_tensors(const Config& c);

// --- Conversion (Hugging Face folder -> GGUF) -------------------------------------------------

// How multipole-convert turns a checkpoint without FMA (a Llama or Mistral folder) into an FMA
// model. The summaries start as average pooling: avgpool needs no weights, groupedconv gets
// weights that compute that pooling (bias 0), so the converted model starts as the avgpool one.
struct FmaConversion {
  Downsampling downsampling = Downsampling::AvgPool;  // avgpool or groupedconv
  int block_size = 64;                                // m
  int rank = 4;                                       // p
  int64_t trained_length = 0;  // n; 0: the checkpoint's max_position_embeddings
};
// c (an exact-attention config) with FMA as f says; throws Error naming the option at fault.
Config with_fma(const Config& c, const FmaConversion& f);
// The groupedconv weight [p*d, 1, w] of level `level` that computes avgpool's summaries.
std::vector<float> avgpool_as_groupedconv(const Config& c, int level);

struct ConvertOptions {
  // Storage of the matrices (embedding, LM head and summary convolutions included, as
  // llama.cpp's Q8_0 files); norms and biases stay f32. With Q8_0, a tensor whose rows (innermost
  // dimension) are not whole blocks of 32 is stored bf16.
  DType dtype = DType::BF16;
  bool overwrite = false;
  std::optional<FmaConversion> fma;  // turn an exact-attention checkpoint into FMA
  // Replaces the recommended sampling the source has (generation_config.json, or the GGUF's).
  SamplingRecommendation sampling;
  std::function<void(size_t done, size_t total, const std::string& tensor)> progress;
};
// Reads config.json, model.safetensors (or the sharded index) and tokenizer.model from hf_dir,
// checks every tensor against the config and writes out_path crash-safely (a temporary file,
// fsynced, renamed over out_path: out_path is never a partial model).
// Accepts our FmaForCausalLM folders and Hugging Face LlamaForCausalLM / MistralForCausalLM ones
// (exact attention unless opts.fma); refuses, naming the field or tensor, what the engine does not
// compute (another tokenizer, rope scaling other than linear, sliding windows, biases, ...).
// tokenizer_config.json's "chat_template", when present, becomes tokenizer.chat_template.
void convert_hf_to_gguf(const std::string& hf_dir, const std::string& out_path,
                        const ConvertOptions& opts);
// A Multipole GGUF file stored again with opts.dtype (as convert_hf_to_gguf stores its matrices:
// e.g. the bf16 default model as Q8_0); opts.fma must be empty. Crash-safe as convert_hf_to_gguf.
void convert_gguf(const std::string& in_path, const std::string& out_path,
                  const ConvertOptions& opts);
Config config_from_hf_json(const std::string& json_text);
// Bytes of one sequence's state on the CPU backend (Backend::slot_bytes) after `tokens` tokens:
// fixed with FMA, growing with `tokens` in exact mode.
size_t cpu_state_bytes(const Config& c, int64_t tokens);

// --- Files ------------------------------------------------------------------------------------

// Writes `bytes` to `path` crash-safely: to a temporary file beside it, fsynced, renamed over
// `path`, the folder fsynced. Whenever the writer dies, `path` is the old file or the new one.
void write_file_atomic(const std::string& path, std::string_view bytes);

// --- Tokenizer --------------------------------------------------------------------------------

class Tokenizer {
 public:
  explicit Tokenizer(std::string_view spm_model_bytes, const Config& c);
  ~Tokenizer();
  std::vector<int> encode(std::string_view text, bool add_bos) const;
  std::string decode(std::span<const int> ids) const;
  std::string piece(int id) const;
  int vocab_size() const;
  std::string model_bytes() const;  // the SentencePiece model, serialized (to write a GGUF again)
  int bos() const { return bos_; }
  int eos() const { return eos_; }
  bool add_bos() const { return add_bos_; }

  // What one token adds to decode()'s text, so that text can be built one token at a time
  // (TextStream). decode() is SentencePiece's: byte-fallback pieces are joined into UTF-8 within a
  // run of them (an invalid byte becomes U+FFFD), control pieces end such a run, and the first
  // text piece loses its leading space when the model adds a dummy prefix.
  struct Surface {
    enum Kind : uint8_t {
      Hidden,   // decode() drops it (BOS, EOS, ids outside the SentencePiece vocabulary)
      Control,  // renders nothing but ends a run of byte pieces
      Text,     // `text`, with its first byte dropped at the start when `leading_space`
      Byte,     // the byte text[0]
    } kind = Hidden;
    bool leading_space = false;
    std::string text;
  };
  const Surface& surface(int id) const;  // any id; unknown ones are Hidden
  bool strips_leading_space() const { return strips_leading_space_; }
  // Whether encode() cuts long texts into parts (encoded on several threads) for this tokenizer:
  // only where the parts' tokens are provably the whole text's (tokenizer.cpp, splitting()).
  bool encodes_in_parts() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<Surface> surfaces_;
  bool strips_leading_space_ = false;
  int bos_, eos_;
  bool add_bos_;
};

// Turns generated ids into text pieces that are safe to emit: whole UTF-8 characters only, and
// never text that could still turn out to be the start of a stop string. The pieces joined equal
// Tokenizer::decode() of the ids (cut before the first stop string). Each token costs work bounded
// by its piece's and the stop strings' lengths, never by the length of the text so far.
class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stop);
  // Adds a token; appends the newly safe text to `out` (no allocation once `out` has room).
  // Sets stopped() when a stop string appeared (the stop string and what follows are not
  // emitted).
  void push(int id, std::string& out);
  std::string push(int id);  // the same, returning the text
  std::string flush();       // at the end: everything held back (unless stopped)
  bool stopped() const { return stopped_; }
  // Bytes examined so far, a count of the stream's work (tests check it stays flat per token).
  uint64_t work() const { return work_; }

 private:
  void take_bytes(bool run_ended, std::string& to);  // resolves pending byte-fallback bytes
  void release(std::string& out);                    // held_'s text past the stop-string matcher

  const Tokenizer& tok_;
  std::vector<std::string> stop_;
  std::string pending_;  // bytes of a UTF-8 character not yet complete (at most 3)
  std::string held_;     // resolved text that may be the start of a stop string
  bool at_start_ = true;
  bool stopped_ = false;
  uint64_t work_ = 0;
};

// --- Sampling (SamplingParams above, beside Model) ---------------------------------------------

// (id, count) of the ids the penalties see, sorted by id (PenaltyCounts keeps them).
using PenaltyList = std::span<const std::pair<int, int>>;

// The candidates that survive the filters (after penalties, temperature, top-k, top-p, min-p),
// sorted by probability (ties: lower id first), with their renormalised probabilities; with all
// three filters off, the whole vocabulary in id order.
std::vector<std::pair<int, float>> sample_candidates(const SamplingParams& p,
                                                     std::span<const float> logits,
                                                     PenaltyList penalties);
// The candidate at which the cumulative probability first exceeds u (in [0, 1)).
int pick_candidate(std::span<const std::pair<int, float>> candidates, double u);

// The penalties' view of one sequence: how often each id occurs among its last penalty_last_n
// tokens (prompt included; -1: all of them), updated one token at a time. A token costs a
// binary search, plus moving the list when an id enters or leaves it (bounded by the
// vocabulary), whatever the length of the sequence. Inert when no penalty is on.
class PenaltyCounts {
 public:
  PenaltyCounts(const SamplingParams& p, int vocab);
  void push(int id);
  PenaltyList counts() const { return counts_; }
  uint64_t work() const { return work_; }  // elements visited or moved so far (for the tests)

 private:
  void add(int id, int delta);
  bool active_;
  int window_;  // -1: every token
  int vocab_;
  std::vector<int> ring_;  // the window's ids when it is bounded, oldest at ring_head_
  size_t ring_head_ = 0;
  std::vector<std::pair<int, int>> counts_;
  uint64_t work_ = 0;
};

// A sequence's sampling: its parameters and its own random stream (seeded: reproducible).
class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int sample(std::span<const float> logits, PenaltyList penalties) {
    return pick_candidate(candidates(logits, penalties), draw());
  }
  std::vector<std::pair<int, float>> candidates(std::span<const float> logits,
                                                PenaltyList penalties) const {
    return sample_candidates(p_, logits, penalties);
  }
  double draw();  // the next uniform in [0, 1) of the stream; one per sampled token
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  uint64_t rng_state_;
};

// log-softmax of one row, in double for accuracy.
std::vector<float> log_softmax(std::span<const float> logits);

// --- Backends and the per-sequence state --------------------------------------------------------

// One sequence's tokens for one forward call: they are appended to the slot's state.
struct SeqChunk {
  int slot = 0;
  std::span<const int> tokens;
  bool all_logits = false;  // logits for every token, else only for the last
};

// How forward_sample samples one chunk's next token.
struct SampleSpec {
  const SamplingParams* params = nullptr;  // null: no token wanted (a prompt chunk mid-way)
  PenaltyList penalties;                   // what the penalties see (PenaltyCounts)
  double uniform = 0;                      // the draw that picks the token (Sampler::draw())
  int top_logprobs = 0;                    // also return the N likeliest tokens
};
struct SampledToken {
  int token = -1;
  float logprob = 0;  // log-probability under the model (before penalties and filters)
  // The top_logprobs likeliest tokens and their log-probabilities, likeliest first (ties: lower
  // id first), when asked for.
  std::vector<std::pair<int, float>> top_logprobs;
};

// One device's share of a backend spread over several (replicas): what /metrics reports.
struct DeviceStats {
  std::string device;  // "cuda:1", "cpu:0"
  int slots = 0, slots_in_use = 0;
  uint64_t tokens = 0;      // tokens run on it (prompt and generated)
  uint64_t steps = 0;       // forward calls that ran on it
  double busy_seconds = 0;  // time its forward calls took
};

// A backend runs the model over batches of sequences. Each sequence lives in a slot holding its
// fixed-size hierarchical cache (DESIGN.md section 2).
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual const Config& config() const = 0;
  virtual int n_slots() const = 0;
  virtual int alloc_slot() = 0;  // -1 when none is free
  virtual void free_slot(int slot) = 0;
  virtual void reset_slot(int slot) = 0;         // back to position 0
  virtual void copy_slot(int src, int dst) = 0;  // fork
  virtual int64_t slot_pos(int slot) const = 0;  // tokens processed so far
  virtual std::vector<uint8_t> save_slot(int slot) const = 0;
  virtual void load_slot(int slot, std::span<const uint8_t> bytes) = 0;  // throws on mismatch
  virtual size_t slot_bytes(int slot) const = 0;  // memory held by the slot's state
  // Prompt tokens a scheduler step should read at most: large enough to run near the backend's
  // prefill speed, small enough to keep a step short (measured: docs/PERF.md).
  virtual int prefill_tokens_per_step() const = 0;
  // Runs the chunks; returns logits, vocab_size floats per requested row, chunk by chunk.
  virtual std::vector<float> forward(std::span<const SeqChunk> chunks) = 0;
  // Runs the chunks (each wanting its last row only) and samples each one's next token as
  // pick_candidate(sample_candidates(...), uniform) would. The CUDA backend samples on the GPU,
  // so only ids cross to the host; this default samples on the host from forward()'s logits.
  virtual std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                                   std::span<const SampleSpec> specs);
  // forward_sample in two halves, so that the caller's host work overlaps the device's: start
  // launches the step and returns, finish waits for it and returns what forward_sample would
  // have. finish takes the same chunks and specs (unchanged until it returns), and no other call
  // on those slots comes in between. By default start runs forward_sample whole and finish hands
  // its result over.
  virtual void start_sample(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs);
  virtual std::vector<SampledToken> finish_sample(std::span<const SeqChunk> chunks,
                                                  std::span<const SampleSpec> specs);
  // True when start_sample returns while the device still runs the step (the CUDA backend).
  virtual bool samples_asynchronously() const { return false; }
  // One entry per device of a backend spread over several (replicas), else empty. Safe to call
  // from any thread while another runs the model.
  virtual std::vector<DeviceStats> device_stats() const { return {}; }
  // The devices a backend spreads its slots over (replicas; else 1) and a slot's device. Calls
  // whose slots all lie on one device may run at the same time as calls on other devices, one
  // thread per device (the scheduler's step loop per device); alloc_slot and free_slot may then
  // be called from any of those threads. A backend of one device is called from one thread.
  virtual int n_devices() const { return 1; }
  virtual int slot_device(int /*slot*/) const { return 0; }

 private:
  std::vector<SampledToken> started_;  // the default start_sample's result
};

struct BackendOptions {
  std::string kind = "auto";  // "auto" (CUDA when built and a GPU is present), "cpu", "cuda"
  int n_slots = 4;
  int n_threads = 0;  // CPU threads; 0: all cores
  // Exact attention on the CUDA backend keeps a KV cache of this many tokens per slot
  // (0: the trained length). FMA slots have a fixed size whatever the length.
  int64_t max_context = 0;
  // Replicas: one backend of n_slots slots per listed device, presented as one backend whose
  // slot i lives on device i % N; alloc_slot picks the least loaded device. Empty: device 0
  // alone. With kind "cpu" each entry is one more CPU backend (what the tests spread over).
  std::vector<int> devices = {};
  // Tensor parallelism (Megatron style: attention heads and FFN columns split, their outputs
  // summed): 0 off; N >= 1 runs N shards (1: the same path unsplit, for tests). On GPUs the
  // shards run on `devices` (default 0..N-1) and sum over NCCL (builds with NCCL only); on the
  // CPU they are threads summing through shared memory.
  int tensor_parallel = 0;
  // CPU backend, products of more than 8 rows (prefill) by bf16 weights where the CPU has bf16
  // units (AMX, AVX512-BF16); by default they split each activation into two bf16 parts (fp32
  // to about 1e-5). cpu_fp32_products: fp32 (oneDNN's sgemm) instead. cpu_bf16_activations:
  // the activations rounded once to bf16, as llama.cpp does: faster, up to 0.05 nats of
  // log-probability on the default model (docs/PERF.md, "bf16 products").
  bool cpu_fp32_products = false;
  bool cpu_bf16_activations = false;
};
std::unique_ptr<Backend> make_backend(std::shared_ptr<const Model> model,
                                      const BackendOptions& opts);
bool cuda_available();    // built with CUDA and a device is present
int cuda_device_count();  // 0 without CUDA
// "all" (every CUDA device; the one CPU device 0 without any) or a list "0,1,3": device ids,
// checked (no repeats, each below cuda_device_count() unless kind is "cpu").
std::vector<int> parse_devices(std::string_view spec, std::string_view kind);

// Negative log-likelihoods (nats) of tokens[1..] given their prefix, the sequence run through a
// fresh slot in prefill chunks of `chunk` tokens. Throws when no slot is free.
std::vector<double> token_nlls(Backend& b, std::span<const int> tokens, int chunk);

// Saves/loads a slot's state to a file (format: README.md, "The model file"). Saving is
// crash-safe (temporary file, fsync, rename); loading refuses a truncated, corrupt (checksum) or
// foreign state with an Error naming the file.
void save_state_file(const Backend& b, int slot, const std::string& path);
void load_state_file(Backend& b, int slot, const std::string& path);

// A 64-bit hash of bytes (not cryptographic): checksums of state files, cache keys.
uint64_t hash_bytes(std::span<const uint8_t> bytes);

// --- Scheduler: continuous batching over a backend's slots -------------------------------------

// What a request reports as it runs: each new piece of text, then a final event.
struct CompletionEvent {
  std::string text;   // newly safe text (may be empty)
  int token = -1;     // the token that produced it (-1 on the final event)
  float logprob = 0;  // log-probability of `token` under the model (after penalties: no)
  std::vector<std::pair<int, float>> top_logprobs;  // top-N alternatives, when asked for
  bool done = false;
  std::string finish_reason;  // "stop", "length", "cancelled" or "error: ..." when done
  int prompt_tokens = 0, completion_tokens = 0;
  int cached_tokens = 0;   // prompt tokens restored from the prefix cache rather than read
  size_t state_bytes = 0;  // the sequence's state (Backend::slot_bytes) after this event
  // The final event of a request with keep_state that finished with "stop" or "length": the
  // state (Backend::save_slot bytes) after the prompt and every generated token but the last,
  // which is `unfed_token` (-1 when nothing was generated).
  std::shared_ptr<const std::vector<uint8_t>> state;
  int unfed_token = -1;
};

struct CompletionRequest {
  std::vector<int> prompt;  // token ids, BOS included if wanted
  SamplingParams sampling;
  int max_tokens = 16;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  int logprobs = 0;  // top-N alternatives per token (0: none)
  // Start from this state (Backend::save_slot bytes, e.g. a session's) instead of an empty one:
  // the prompt continues it. Such a request neither reads nor fills the prefix cache.
  std::shared_ptr<const std::vector<uint8_t>> start_state;
  bool keep_state = false;  // the final event carries the state (CompletionEvent::state)
  // Called on one of the scheduler's event threads; should not block for long (it delays the
  // events of other requests). Returning false cancels the request.
  std::function<bool(const CompletionEvent&)> on_event;
};

struct SchedulerOptions {
  int max_queue = 64;  // waiting requests beyond the running ones
  // Prompt tokens read per step, all sequences together: the bound on how long a step, and so a
  // generating stream's gap between tokens, lasts while prompts are read. 0: the backend's
  // Backend::prefill_tokens_per_step(). Over several devices each device's step reads its even
  // share.
  int max_prefill_per_step = 0;
  // Threads that hand events to the requests' callbacks (0: half the cores, 2 to 8): at a
  // thousand streams they deliver a quarter of a million events a second (docs/PERF.md).
  int event_threads = 0;
  // The prefix cache (off when both tiers are empty): snapshots every prefix_block prompt tokens
  // and at each prompt's end, kept in prefix_cache_slots backend slots that the scheduler takes
  // for itself, then in prefix_cache_bytes of host memory.
  int prefix_block = 4096;
  int prefix_cache_slots = 0;
  size_t prefix_cache_bytes = 0;
  // A line on stderr per step: its rows, prompt tokens, and where the model thread's time went
  // (setting up new sequences, the backend, the scheduler's own work).
  bool log_steps = false;
  // The nice value the step loops ask for. Every stream waits on them, and a step's host part
  // (planning, sampling's hand-over, the tokens' text) slows down when the host's other threads
  // share its core. Unset: the loops keep the priority of the thread that made the scheduler. A
  // value below that needs root or CAP_SYS_NICE: refused, a loop keeps it (and says so on
  // stderr). Any value counts, 0 too (a server started under `nice` may ask for 0).
  std::optional<int> step_loop_nice = std::nullopt;
};

struct PrefixCacheStats {
  uint64_t lookups = 0, hits = 0, cached_tokens = 0, stores = 0, evictions = 0;
  size_t slots = 0, entries_in_slots = 0, entries_on_host = 0, host_bytes = 0, host_capacity = 0;
};

struct SchedulerStats {
  int slots = 0, slots_in_use = 0, queued = 0, max_queue = 0;
  uint64_t requests_done = 0, prompt_tokens = 0, completion_tokens = 0;
  uint64_t steps = 0;  // of every device's step loop together
  // Time the step loops spent in steps (summed over devices), and the part of it inside the
  // backend's calls: their difference is the scheduler's own host work.
  double step_seconds = 0, backend_seconds = 0;
  PrefixCacheStats prefix;
  std::vector<DeviceStats> devices;  // Backend::device_stats(): per device with replicas
};

// Thread-safe: any thread submits and cancels; one internal thread per device of the backend
// (Backend::n_devices) runs that device's sequences, without waiting for the other devices. Each
// of its steps runs one token of every generating sequence and, within the step's prompt-token
// budget (its share of max_prefill_per_step), the next prompt chunks in arrival order, in one
// batch. New requests go, in arrival order, to a free slot of the least loaded device. Events reach
// the callbacks from separate event threads (a request's events in order, on one thread), so a slow
// callback never delays a step.
class Scheduler {
 public:
  Scheduler(Backend& backend, const Tokenizer& tok, SchedulerOptions opts = {});
  ~Scheduler();  // cancels what is left and joins
  // Returns the request id; throws BusyError when the queue is full.
  uint64_t submit(CompletionRequest req);
  void cancel(uint64_t id);
  SchedulerStats stats() const;
  // Stops admitting requests; running and queued ones are cancelled.
  void shutdown();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Marks the calling thread as throughput work: Linux SCHED_BATCH (when it is woken it does not
// preempt the thread running on that core) and kBackgroundNice above its nice value (about a
// tenth of the share of a contended core that the process's other threads get). The scheduler's
// event threads and the server's HTTP threads use it, so that handing tokens to clients never
// takes the core of a step loop, which every stream waits on: when the host's cores are all busy,
// delivery falls behind and each write then carries several tokens, instead of every step slowing
// down. Names the thread `name` (as `top -H` and /proc show it; at most 15 characters are kept).
inline constexpr int kBackgroundNice = 10;
void set_batch_scheduling(const char* name);
// Names the calling thread (at most 15 characters are kept).
void name_this_thread(const char* name);

class BusyError : public Error {
 public:
  using Error::Error;
};

}  // namespace mp
