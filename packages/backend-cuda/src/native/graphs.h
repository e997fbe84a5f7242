// ds3 CUDA backend: decode steps as CUDA graphs, with the model file unchanged.
//
// The model issues ops one by one from JS. Every op reaches the native side as (op id, numeric
// arguments, host bytes for uploads); device tensors are addresses in a per-step bump arena, so the
// same op sequence from the same arena state yields the same addresses. A *segment* is the run of
// ops between two synchronization points (beginStep, download, argmax, ...). Segments are keyed by
// (arena state, staging offset, first op); for each key the recorder keeps the op sequences seen:
//   1st sighting   eager: ops run as they come, their keys are recorded;
//   2nd sighting   capture: the same ops run under stream capture and become a cudaGraph; uploads are
//                  captured as copies out of fixed offsets of the pinned staging buffer;
//   later          replay: ops are NOT run; each op's key is checked against the recording and the
//                  recorded output address is returned; uploads only write their bytes into the
//                  staging offsets the graph copies from. A capture is cut into chunks (one graph
//                  each) before every upload that comes after at least minChunk ops, so that inputs
//                  uploaded late in a step (the logit rows of Transformer.forward) do not hold back the
//                  rest: a chunk is launched once its uploads are staged and the op after its last
//                  upload matched, so the GPU starts while JS issues the rest of the step; at the
//                  segment's end the arena is set to the state the recording ended in.
// If a replayed segment diverges (an op that does not match, or a segment that ends early), the ops
// seen so far are re-run eagerly in stream order (after the graph, if it was already launched) from
// the same arena state, which reproduces the addresses JS already holds; the segment then goes on
// eagerly. A graph launched early may have run ops past the divergence: their arena temporaries are
// rewritten by the re-run, and their latent-cache writes go to this step's token positions, which the
// model's forward writes in every layer anyway.
//
// Host is the glue (addon.cpp, or a mock in graph_test.cpp):
//   uint64_t exec(const OpKey&, const void* data, int64_t* stageAt)   run one op now (or capture it);
//            may throw NeedsSync while capturing (it would have to wait for the stream)
//   ArenaState arena(); void setArena(const ArenaState&); size_t stageOff(); void setStageOff(size_t)
//   void stage(int64_t off, const void* data, size_t bytes)           write bytes into pinned staging
//   bool beginCapture(); void* endCapture() (nullptr: failed); void launch(void*); void destroy(void*)
#pragma once
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ds3g {

constexpr int MAXA = 20;

struct OpKey {
  int op = 0;
  int n = 0;
  uint32_t bytes = 0;  // uploads: bytes of host data
  double a[MAXA] = {};
};
inline bool sameKey(const OpKey& x, const OpKey& y) {
  return x.op == y.op && x.n == y.n && x.bytes == y.bytes && std::memcmp(x.a, y.a, sizeof(double) * size_t(x.n)) == 0;
}
inline uint64_t hashKey(const OpKey& k, uint64_t h = 1469598103934665603ull) {
  auto mix = [&](uint64_t v) {
    h ^= v;
    h *= 1099511628211ull;
  };
  mix(uint64_t(k.op));
  mix(uint64_t(k.n));
  mix(k.bytes);
  for (int i = 0; i < k.n; i++) {
    uint64_t u;
    std::memcpy(&u, &k.a[i], 8);
    mix(u);
  }
  return h;
}

struct ArenaState {
  size_t cur = 0, off = 0, used = 0;
  bool operator==(const ArenaState& o) const { return cur == o.cur && off == o.off; }
};

/** thrown by Host::exec while capturing when the op would have to synchronize */
struct NeedsSync {};

struct GraphStats {
  uint64_t eagerSegments = 0, captures = 0, replays = 0, fallbacks = 0, captureFailures = 0, earlyLaunches = 0, evictions = 0;
};

template <class Host>
class StepGraphs {
 public:
  explicit StepGraphs(Host& h) : h_(h) {}
  ~StepGraphs() { clear(); }

  bool enabled = false;
  /** segments shorter than this are never captured */
  size_t minOps = 16;
  /** launch replayed chunks as soon as their inputs are staged (false: at the segment's end) */
  bool earlyLaunch = true;
  /** a capture is cut before an upload once the current chunk holds this many ops */
  size_t minChunk = 8;
  size_t maxEntries = 48;
  GraphStats stats;

  bool active() const { return mode_ != PENDING; }
  size_t entries() const {
    size_t n = 0;
    for (auto& kv : byKey_) n += kv.second.size();
    return n;
  }

  /** one op: runs it, captures it or replays it */
  uint64_t op(const OpKey& k, const void* data) {
    if (!enabled) return h_.exec(k, data, nullptr);
    if (mode_ == PENDING) begin(k);
    switch (mode_) {
      case CAPTURE: return captureOp(k, data);
      case REPLAY: return replayOp(k, data);
      default: return eagerOp(k, data);
    }
  }

  /** end of a segment (a synchronization point, or any call that is not an op) */
  void flush() {
    const Mode m = mode_;
    mode_ = PENDING;
    if (m == PENDING) return;
    if (m == EAGER) {
      registerEager();
    } else if (m == CAPTURE) {
      void* ex = h_.endCapture();
      if (!ex) {
        stats.captureFailures++;
        dropChunks();
        markFailed();
        rerun(false);
      } else {
        capChunks_.push_back({ex, chunkBegin_, cur_.keys.size(), 0});
        Entry* e = findExact();
        if (!e) e = addEntry();
        destroyChunks(*e);
        e->keys = cur_.keys;
        e->outs = cur_.outs;
        e->stageAt = cur_.stageAt;
        e->chunks = capChunks_;
        capChunks_.clear();
        e->endArena = h_.arena();
        e->endStage = h_.stageOff();
        setLaunchPoints(*e);
        e->lastUse = ++clock_;
        stats.captures++;
        for (auto& c : e->chunks) h_.launch(c.exec);
      }
    } else if (m == REPLAY) {
      if (pos_ == cand_->keys.size()) {
        while (launched_ < cand_->chunks.size()) h_.launch(cand_->chunks[launched_++].exec);
        h_.setArena(cand_->endArena);
        h_.setStageOff(cand_->endStage);
        cand_->lastUse = ++clock_;
        stats.replays++;
      } else {
        fallback();
        registerEager();
      }
    }
    cur_.clear();
    cand_ = nullptr;
  }

  /** forget every graph (after flush) */
  void clear() {
    for (auto& kv : byKey_)
      for (auto& e : kv.second) destroyChunks(*e);
    byKey_.clear();
    dropChunks();
    cand_ = nullptr;
  }

 private:
  enum Mode { PENDING, EAGER, CAPTURE, REPLAY };
  struct Chunk {
    void* exec = nullptr;
    size_t begin = 0, end = 0;  // ops [begin, end) of the segment
    size_t launchAt = 0;        // launched once this many ops of the segment have matched
  };
  struct Entry {
    ArenaState start;
    size_t startStage = 0;
    std::vector<OpKey> keys;
    std::vector<uint64_t> outs;
    std::vector<int64_t> stageAt;
    int seen = 0;
    bool failed = false;
    std::vector<Chunk> chunks;  // empty: seen, not captured
    bool captured() const { return !chunks.empty(); }
    ArenaState endArena;
    size_t endStage = 0;
    uint64_t lastUse = 0;
  };
  struct Seg {
    std::vector<OpKey> keys;
    std::vector<uint64_t> outs;
    std::vector<int64_t> stageAt;
    std::vector<uint8_t> data;     // upload bytes kept for a re-run (capture and replay only)
    std::vector<int64_t> dataOff;  // per op: offset into data, -1 if none
    void clear() {
      keys.clear();
      outs.clear();
      stageAt.clear();
      data.clear();
      dataOff.clear();
    }
    const void* dataOf(size_t i) const { return dataOff[i] < 0 ? nullptr : data.data() + dataOff[i]; }
    void keep(const OpKey& k, const void* d) {
      if (k.bytes && d) {
        dataOff.push_back(int64_t(data.size()));
        data.insert(data.end(), static_cast<const uint8_t*>(d), static_cast<const uint8_t*>(d) + k.bytes);
      } else {
        dataOff.push_back(-1);
      }
    }
  };

  uint64_t sigOf(const OpKey& k) const {
    uint64_t h = hashKey(k);
    for (uint64_t v : {uint64_t(start_.cur), uint64_t(start_.off), uint64_t(startStage_)}) h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
  }
  bool sameStart(const Entry& e) const { return e.start == start_ && e.startStage == startStage_; }
  /** e's ops [0, n) are the ones seen so far */
  bool samePrefix(const Entry& e, size_t n) const {
    if (e.keys.size() < n || cur_.keys.size() < n) return false;
    for (size_t i = 0; i < n; i++)
      if (!sameKey(e.keys[i], cur_.keys[i]) || e.outs[i] != cur_.outs[i]) return false;
    return true;
  }

  void begin(const OpKey& k) {
    start_ = h_.arena();
    startStage_ = h_.stageOff();
    sig_ = sigOf(k);
    cur_.clear();
    cand_ = nullptr;
    pos_ = 0;
    launched_ = 0;
    chunkBegin_ = 0;
    dropChunks();
    auto it = byKey_.find(sig_);
    if (it != byKey_.end()) {
      for (auto& e : it->second)
        if (e->captured() && sameStart(*e) && sameKey(e->keys[0], k)) {
          cand_ = e.get();
          mode_ = REPLAY;
          return;
        }
      for (auto& e : it->second)
        if (!e->captured() && !e->failed && e->seen >= 1 && e->keys.size() >= minOps && sameStart(*e) && sameKey(e->keys[0], k)) {
          if (h_.beginCapture()) {
            mode_ = CAPTURE;
            return;
          }
          break;
        }
    }
    mode_ = EAGER;
  }

  uint64_t eagerOp(const OpKey& k, const void* data) {
    int64_t st = -1;
    const uint64_t out = h_.exec(k, data, &st);
    cur_.keys.push_back(k);
    cur_.outs.push_back(out);
    cur_.stageAt.push_back(st);
    cur_.dataOff.push_back(-1);
    return out;
  }

  uint64_t captureOp(const OpKey& k, const void* data) {
    if (k.bytes && cur_.keys.size() - chunkBegin_ >= minChunk) {  // cut: this upload starts a new chunk
      void* ex = h_.endCapture();
      if (ex) capChunks_.push_back({ex, chunkBegin_, cur_.keys.size(), 0});
      if (!ex || !h_.beginCapture()) {
        stats.captureFailures++;
        markFailed();
        dropChunks();
        mode_ = EAGER;
        rerun(false);
        return eagerOp(k, data);
      }
      chunkBegin_ = cur_.keys.size();
    }
    int64_t st = -1;
    uint64_t out;
    try {
      out = h_.exec(k, data, &st);
    } catch (const NeedsSync&) {
      abortCapture();
      return eagerOp(k, data);
    } catch (...) {
      abortCapture();
      throw;
    }
    if (k.bytes && st < 0) {  // an upload that did not go through staging cannot be replayed
      abortCapture();
      // rerun() restored the start state and re-ran the ops before k; k runs again now, eagerly
      return eagerOp(k, data);
    }
    cur_.keys.push_back(k);
    cur_.outs.push_back(out);
    cur_.stageAt.push_back(st);
    cur_.keep(k, data);
    return out;
  }

  uint64_t replayOp(const OpKey& k, const void* data) {
    if (pos_ < cand_->keys.size() && !sameKey(cand_->keys[pos_], k)) switchCandidate(k);
    if (pos_ < cand_->keys.size() && sameKey(cand_->keys[pos_], k)) {
      if (k.bytes) h_.stage(cand_->stageAt[pos_], data, k.bytes);
      const uint64_t out = cand_->outs[pos_];
      cur_.keys.push_back(k);
      cur_.outs.push_back(out);
      cur_.stageAt.push_back(cand_->stageAt[pos_]);
      cur_.keep(k, data);
      pos_++;
      while (earlyLaunch && launched_ < cand_->chunks.size() && pos_ >= cand_->chunks[launched_].launchAt && pos_ < cand_->keys.size()) {
        h_.launch(cand_->chunks[launched_++].exec);
        stats.earlyLaunches++;
      }
      return out;
    }
    return divert(k, data);
  }

  /** another captured recording with the same start whose ops so far are the ones seen and that goes on
   *  with k; the chunks already launched must hold only ops seen so far, and the other recording must
   *  have the same chunks there (the same ops: that work is done) */
  void switchCandidate(const OpKey& k) {
    for (size_t c = 0; c < launched_; c++)
      if (cand_->chunks[c].end > pos_) return;
    auto it = byKey_.find(sig_);
    if (it == byKey_.end()) return;
    for (auto& e : it->second) {
      if (!e->captured() || e.get() == cand_ || !sameStart(*e) || e->keys.size() <= pos_ || !sameKey(e->keys[pos_], k)) continue;
      if (e->chunks.size() < launched_ || !samePrefix(*e, pos_)) continue;
      bool ok = true;
      for (size_t c = 0; c < launched_ && ok; c++) ok = e->chunks[c].begin == cand_->chunks[c].begin && e->chunks[c].end == cand_->chunks[c].end;
      if (ok) {
        cand_ = e.get();
        return;
      }
    }
  }

  /** the replay diverged at k: re-run what was seen (after whatever chunks were launched, in stream
   *  order), under capture when k continues a pattern seen once before (two step kinds that share a
   *  start, e.g. decode at two context buckets), else eagerly */
  uint64_t divert(const OpKey& k, const void* data) {
    Entry* next = nullptr;
    auto it = byKey_.find(sig_);
    if (it != byKey_.end())
      for (auto& e : it->second) {
        if (e->captured() || e->failed || e->seen < 1 || e->keys.size() < minOps || !sameStart(*e) || e->keys.size() <= pos_ ||
            !sameKey(e->keys[pos_], k) || !samePrefix(*e, pos_))
          continue;
        next = e.get();
        break;
      }
    stats.fallbacks++;
    cand_ = nullptr;
    launched_ = 0;
    if (next && h_.beginCapture()) {
      mode_ = CAPTURE;
      chunkBegin_ = 0;
      dropChunks();
      try {
        rerun(true);
      } catch (const NeedsSync&) {
        abortCapture();
        return eagerOp(k, data);
      }
      return captureOp(k, data);
    }
    mode_ = EAGER;
    rerun(false);
    return eagerOp(k, data);
  }

  /** run the ops of this segment seen so far again (eagerly, or under capture), from the segment's start
   *  state; they land at the addresses JS already holds. Under capture, uploads past minChunk ops cut
   *  chunks as captureOp does. */
  void rerun(bool capturing) {
    h_.setArena(start_);
    h_.setStageOff(startStage_);
    for (size_t i = 0; i < cur_.keys.size(); i++) {
      if (capturing && cur_.keys[i].bytes && i - chunkBegin_ >= minChunk) {
        void* ex = h_.endCapture();
        if (ex) capChunks_.push_back({ex, chunkBegin_, i, 0});
        if (!ex || !h_.beginCapture()) throw NeedsSync{};
        chunkBegin_ = i;
      }
      int64_t st = -1;
      const uint64_t out = h_.exec(cur_.keys[i], cur_.dataOf(i), &st);
      if (out != cur_.outs[i])
        throw std::runtime_error("CUDA graph fallback: op " + std::to_string(cur_.keys[i].op) + " re-ran at a different address");
      if (capturing && cur_.keys[i].bytes && st < 0) throw NeedsSync{};
      cur_.stageAt[i] = st;
    }
    if (!capturing) {
      cur_.data.clear();
      for (auto& d : cur_.dataOff) d = -1;
    }
  }

  void fallback() {
    stats.fallbacks++;
    mode_ = EAGER;
    cand_ = nullptr;
    launched_ = 0;
    rerun(false);
  }

  /** the capture cannot go on: drop its graphs, re-run what was seen eagerly, go on eagerly */
  void abortCapture() {
    void* ex = h_.endCapture();
    if (ex) h_.destroy(ex);
    stats.captureFailures++;
    markFailed();
    dropChunks();
    mode_ = EAGER;
    rerun(false);
  }
  void dropChunks() {
    for (auto& c : capChunks_)
      if (c.exec) h_.destroy(c.exec);
    capChunks_.clear();
  }
  void destroyChunks(Entry& e) {
    for (auto& c : e.chunks)
      if (c.exec) h_.destroy(c.exec);
    e.chunks.clear();
  }

  void markFailed() {
    if (cur_.keys.empty()) return;
    auto it = byKey_.find(sig_);
    if (it == byKey_.end()) return;
    for (auto& e : it->second)
      if (!e->captured() && sameStart(*e) && sameKey(e->keys[0], cur_.keys[0])) e->failed = true;
  }

  Entry* findExact() {
    auto it = byKey_.find(sig_);
    if (it == byKey_.end()) return nullptr;
    for (auto& e : it->second)
      if (sameStart(*e) && e->keys.size() == cur_.keys.size() && samePrefix(*e, cur_.keys.size())) return e.get();
    return nullptr;
  }

  Entry* addEntry() {
    auto& list = byKey_[sig_];
    if (list.size() >= 4) {  // keep the most recently used
      size_t worst = 0;
      for (size_t i = 1; i < list.size(); i++)
        if (list[i]->lastUse < list[worst]->lastUse) worst = i;
      destroyChunks(*list[worst]);
      list.erase(list.begin() + long(worst));
      stats.evictions++;
    }
    auto e = std::make_unique<Entry>();
    e->start = start_;
    e->startStage = startStage_;
    e->lastUse = ++clock_;
    list.push_back(std::move(e));
    Entry* r = list.back().get();
    evict();
    return r;
  }

  void evict() {
    size_t total = entries();
    while (total > maxEntries) {
      auto wk = byKey_.end();
      size_t wi = 0;
      uint64_t best = UINT64_MAX;
      for (auto it = byKey_.begin(); it != byKey_.end(); ++it)
        for (size_t i = 0; i < it->second.size(); i++)
          if (it->second[i]->lastUse < best && it->first != sig_) {
            best = it->second[i]->lastUse;
            wk = it;
            wi = i;
          }
      if (wk == byKey_.end()) break;
      destroyChunks(*wk->second[wi]);
      wk->second.erase(wk->second.begin() + long(wi));
      if (wk->second.empty()) byKey_.erase(wk);
      stats.evictions++;
      total--;
    }
  }

  void registerEager() {
    stats.eagerSegments++;
    if (cur_.keys.size() < minOps) return;
    Entry* e = findExact();
    if (e) {
      e->seen++;
      e->lastUse = ++clock_;
      return;
    }
    e = addEntry();
    e->keys = cur_.keys;
    e->outs = cur_.outs;
    e->stageAt = cur_.stageAt;
    e->seen = 1;
  }

  /** each chunk: after its last upload and the op that follows it (in a model step: the first attention
   *  op, whose arguments carry the context-length bucket); a chunk without uploads after its first op */
  void setLaunchPoints(Entry& e) const {
    for (auto& c : e.chunks) {
      size_t at = c.begin + 1;
      for (size_t i = c.begin; i < c.end; i++)
        if (e.keys[i].bytes) at = i + 2;
      c.launchAt = at < c.end ? at : c.end;
    }
  }

  Host& h_;
  Mode mode_ = PENDING;
  ArenaState start_;
  size_t startStage_ = 0;
  uint64_t sig_ = 0;
  Seg cur_;
  Entry* cand_ = nullptr;
  size_t pos_ = 0;
  size_t launched_ = 0;           // chunks of cand_ launched
  size_t chunkBegin_ = 0;         // capture: first op of the chunk being captured
  std::vector<Chunk> capChunks_;  // capture: chunks done
  uint64_t clock_ = 0;
  std::map<uint64_t, std::vector<std::unique_ptr<Entry>>> byKey_;
};

}  // namespace ds3g
