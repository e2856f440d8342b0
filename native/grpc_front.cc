// A gRPC front end in C++ that hands whole batches of calls to Python.
//
// grpcio's Python server crosses the event loop several times per RPC; on small machines that, not the
// model, caps throughput (docs/benchmarks.md). Here gRPC's C++ async generic service does the HTTP/2 work on
// its own threads; every message that arrives is queued, and Python takes everything queued in one call
// (fe_poll, which waits without the GIL: ctypes releases it), so the requests that arrive together reach the
// data plane in the same event-loop turn and can share a batch. Python answers with fe_send. Requests and
// responses are the protocol's serialized protobuf messages: this file knows no message types, only which
// methods stream.
//
// Calls have ids that are never reused (an event of a call that has ended cannot reach a newer one); a call is
// freed once its Finish has completed and no read is outstanding, and an fe_send for it after that is dropped.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

struct Front;
struct Call;

enum Op { NEW, READ, WRITE, FINISH };

struct Tag {
  Call* call;
  Op op;
};

struct Event {
  uint64_t call;
  int kind;  // 0: a message (the first carries method, authorization, peer), 1: the client closed its side
  std::string method, payload, authorization, peer;
};

struct Call {
  Front* front;
  uint64_t id = 0;
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream{&ctx};
  grpc::ByteBuffer in;
  Tag tags[4];
  bool streaming = false, started = false;
  std::mutex mu;  // what follows: Python's thread sends, the completion-queue threads complete
  std::deque<grpc::ByteBuffer> out;
  bool writing = false, reading = false, finish_wanted = false, finish_sent = false, finish_done = false;
  grpc::Status status;
  explicit Call(Front* f) : front(f) {
    for (int op = 0; op < 4; ++op) tags[op] = Tag{this, static_cast<Op>(op)};
  }
};

std::string to_string(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

struct Front {
  grpc::AsyncGenericService service;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  std::unique_ptr<grpc::Server> server;
  std::vector<std::thread> threads;
  std::set<std::string> streaming;
  std::mutex mu;
  std::condition_variable ready;
  std::deque<Event> events;
  std::vector<Event> batch;  // what the last fe_poll returned; its strings live until the next one
  bool closed = false;
  std::mutex calls_mu;
  std::unordered_map<uint64_t, Call*> calls;
  uint64_t next_id = 1;

  void request_call() {
    auto* call = new Call(this);
    {
      std::lock_guard<std::mutex> lock(calls_mu);
      call->id = next_id++;
      calls[call->id] = call;
    }
    service.RequestCall(&call->ctx, &call->stream, cq.get(), cq.get(), &call->tags[NEW]);
  }

  void free(Call* call) {
    {
      std::lock_guard<std::mutex> lock(calls_mu);
      calls.erase(call->id);
    }
    delete call;
  }

  void push(Event event) {
    {
      std::lock_guard<std::mutex> lock(mu);
      events.push_back(std::move(event));
    }
    ready.notify_one();
  }

  // Start the next write or the finish, if nothing is in flight. Called with call->mu held.
  void pump(Call* call) {
    if (call->writing || call->finish_sent) return;
    if (!call->out.empty()) {
      grpc::ByteBuffer next = std::move(call->out.front());
      call->out.pop_front();
      call->writing = true;
      if (call->out.empty() && call->finish_wanted && call->status.ok()) {
        call->finish_sent = true;  // the last message and the status in one operation
        call->stream.WriteAndFinish(next, grpc::WriteOptions(), call->status, &call->tags[FINISH]);
      } else {
        call->stream.Write(next, &call->tags[WRITE]);
      }
    } else if (call->finish_wanted) {
      call->finish_sent = true;
      call->stream.Finish(call->status, &call->tags[FINISH]);
    }
  }

  void read(Call* call) {
    call->reading = true;
    call->stream.Read(&call->in, &call->tags[READ]);
  }

  void complete(Tag* tag, bool ok) {
    Call* call = tag->call;
    switch (tag->op) {
      case NEW: {
        if (!ok) {  // the server is shutting down
          free(call);
          return;
        }
        request_call();  // keep accepting
        call->streaming = streaming.count(call->ctx.method()) > 0;
        std::lock_guard<std::mutex> lock(call->mu);
        read(call);
        return;
      }
      case READ: {
        std::unique_lock<std::mutex> lock(call->mu);
        call->reading = false;
        if (ok) {
          Event event{call->id, 0, "", to_string(call->in), "", ""};
          if (!call->started) {
            call->started = true;
            event.method = call->ctx.method();
            event.peer = call->ctx.peer();
            auto found = call->ctx.client_metadata().find("authorization");
            if (found != call->ctx.client_metadata().end())
              event.authorization.assign(found->second.data(), found->second.size());
          }
          if (call->streaming) read(call);
          lock.unlock();
          push(std::move(event));
          return;
        }
        if (!call->started) {  // gone before its request arrived: nothing for Python to answer
          call->finish_wanted = true;
          call->status = grpc::Status(grpc::StatusCode::CANCELLED, "no request message");
          pump(call);
          return;
        }
        bool tell = call->streaming && !call->finish_sent;
        bool done = call->finish_done;
        lock.unlock();
        if (tell) push(Event{call->id, 1, "", "", "", ""});
        if (done) free(call);
        return;
      }
      case WRITE: {
        std::lock_guard<std::mutex> lock(call->mu);
        call->writing = false;
        if (!ok) call->out.clear();  // the client is gone; the finish still goes out (and fails)
        pump(call);
        return;
      }
      case FINISH: {
        std::unique_lock<std::mutex> lock(call->mu);
        call->writing = false;
        call->finish_done = true;
        bool done = !call->reading;
        lock.unlock();
        if (done) free(call);
        return;
      }
    }
  }

  void run() {
    void* tag;
    bool ok;
    while (cq->Next(&tag, &ok)) complete(static_cast<Tag*>(tag), ok);
  }
};

}  // namespace

extern "C" {

// Listen on `address` ("host:port"); NULL when it cannot (the port is taken, say).
void* fe_start(const char* address, int max_receive, int reuse_port, const char* streaming_methods,
               const char* tls_key, const char* tls_cert, int threads, int* port) {
  auto* front = new Front();
  std::istringstream names(streaming_methods);
  for (std::string name; std::getline(names, name);)
    if (!name.empty()) front->streaming.insert(name);
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (tls_key != nullptr && tls_cert != nullptr) {
    grpc::SslServerCredentialsOptions options;
    options.pem_key_cert_pairs.push_back({tls_key, tls_cert});
    credentials = grpc::SslServerCredentials(options);
  }
  builder.AddListeningPort(address, credentials, port);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, reuse_port);
  builder.SetMaxReceiveMessageSize(max_receive);
  builder.SetMaxSendMessageSize(1 << 30);
  builder.RegisterAsyncGenericService(&front->service);
  front->cq = builder.AddCompletionQueue();
  front->server = builder.BuildAndStart();
  if (!front->server || *port == 0) {
    if (front->server) front->server->Shutdown();
    front->cq->Shutdown();
    void* tag;
    bool ok;
    while (front->cq->Next(&tag, &ok)) {
    }
    delete front;
    return nullptr;
  }
  for (int i = 0; i < 64; ++i) front->request_call();  // calls the server accepts before any completes
  for (int i = 0; i < threads; ++i) front->threads.emplace_back([front] { front->run(); });
  return front;
}

// Wait up to `timeout_ms` for events, then take up to `max_events` of them; how many (-1: closed).
int fe_poll(void* handle, int timeout_ms, int max_events) {
  auto* front = static_cast<Front*>(handle);
  std::unique_lock<std::mutex> lock(front->mu);
  front->ready.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                        [front] { return !front->events.empty() || front->closed; });
  front->batch.clear();
  while (!front->events.empty() && static_cast<int>(front->batch.size()) < max_events) {
    front->batch.push_back(std::move(front->events.front()));
    front->events.pop_front();
  }
  if (front->batch.empty() && front->closed) return -1;
  return static_cast<int>(front->batch.size());
}

// Event `i` of the last poll; the pointers stay valid until the next poll.
void fe_event(void* handle, int i, uint64_t* call, int* kind, const char** method, size_t* method_len,
              const char** payload, size_t* payload_len, const char** authorization, size_t* authorization_len,
              const char** peer, size_t* peer_len) {
  const Event& event = static_cast<Front*>(handle)->batch[i];
  *call = event.call;
  *kind = event.kind;
  *method = event.method.data();
  *method_len = event.method.size();
  *payload = event.payload.data();
  *payload_len = event.payload.size();
  *authorization = event.authorization.data();
  *authorization_len = event.authorization.size();
  *peer = event.peer.data();
  *peer_len = event.peer.size();
}

// Send a response message (payload may be NULL) and/or finish the call with a status (code 0: OK).
void fe_send(void* handle, uint64_t id, const char* payload, size_t length, int finish, int code,
             const char* message) {
  Front* front = static_cast<Front*>(handle);
  std::lock_guard<std::mutex> held(front->calls_mu);  // it cannot be freed meanwhile
  auto found = front->calls.find(id);
  if (found == front->calls.end()) return;  // it has ended
  Call* call = found->second;
  std::lock_guard<std::mutex> lock(call->mu);
  if (call->finish_wanted) return;
  if (payload != nullptr) {
    grpc::Slice slice(payload, length);
    call->out.emplace_back(&slice, 1);
  }
  if (finish) {
    call->finish_wanted = true;
    call->status = code == 0 ? grpc::Status::OK
                             : grpc::Status(static_cast<grpc::StatusCode>(code), message ? message : "");
  }
  call->front->pump(call);
}

// Stop accepting, give calls in flight until `grace_ms` to finish (Python keeps answering), then stop.
void fe_stop(void* handle, int grace_ms) {
  auto* front = static_cast<Front*>(handle);
  front->server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(grace_ms));
  front->cq->Shutdown();
  for (auto& thread : front->threads) thread.join();
  {
    std::lock_guard<std::mutex> lock(front->mu);
    front->closed = true;
  }
  front->ready.notify_all();
}

void fe_free(void* handle) { delete static_cast<Front*>(handle); }

}  // extern "C"
