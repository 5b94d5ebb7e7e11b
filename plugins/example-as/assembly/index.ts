// wasmgate demo plugin (AssemblyScript, @solo-io/proxy-runtime 0.1.8, root id "example").
//
//  on_configure        : reads the plugin configuration (plain text) and logs it at INFO.
//  on_request_headers  : `:path` starting with `/deny` -> local response 403,
//                        body "denied by wasm plugin\n", header `x-denied-by: example`;
//                        otherwise adds request header `x-wasm-example: seen`.
//  on_response_headers : adds response header `x-wasm-greeting: <configuration text>`.
export * from "@solo-io/proxy-runtime/proxy"; // exports the proxy_* callbacks the host drives
import {
  RootContext, Context, registerRootContext, log, LogLevelValues,
  FilterHeadersStatusValues, GrpcStatusValues, HeaderPair, Headers,
  stream_context, send_local_response,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class ExampleRoot extends RootContext {
  greeting: string = "";

  createContext(context_id: u32): Context {
    return new ExampleHttp(context_id, this);
  }

  // The SDK's default onConfigure passes the config *size* as the ret_len
  // out-pointer (an SDK bug that makes the host write into low memory), so
  // read PLUGIN_CONFIGURATION (buffer 7) ourselves with proper out-pointers.
  onConfigure(configuration_size: u32): bool {
    let text = "";
    if (configuration_size > 0) {
      text = String.UTF8.decode(get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size));
    }
    this.greeting = text;
    log(LogLevelValues.info, "example: configured with: " + text);
    return true;
  }
}

class ExampleHttp extends Context {
  root: ExampleRoot;

  constructor(context_id: u32, root_context: ExampleRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    if (path.startsWith("/deny")) {
      const headers: Headers = [];
      headers.push(new HeaderPair(String.UTF8.encode("x-denied-by"), String.UTF8.encode("example")));
      send_local_response(403, "denied_by_wasm_plugin", String.UTF8.encode("denied by wasm plugin\n"),
        headers, GrpcStatusValues.InvalidCode);
      return FilterHeadersStatusValues.StopIteration;
    }
    stream_context.headers.request.add("x-wasm-example", "seen");
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-wasm-greeting", this.root.greeting);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new ExampleRoot(context_id); }, "example");
