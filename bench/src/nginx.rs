//! nginx (Debian's `nginx-light`), one worker process, pinned: the baseline proxy (a
//! plain keep-alive reverse proxy on the gateway's core) and, for the second topology,
//! a static upstream (a fixed chat completion answered from its configuration).

/// The static upstream's answer: the mock upstream's chat completion.
const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"up-bench","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}"#;

use std::path::Path;
use std::time::Duration;

use crate::procs::Pinned;

/// nginx proxying to `upstream`, its files in `dir/<name>`.
pub fn start(core: usize, dir: &Path, name: &str, port: u16, upstream: &str) -> Pinned {
    let server = format!(
        r#"    upstream mock {{
        server {upstream};
        keepalive 128;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"#
    );
    launch(core, &dir.join(name), port, &server)
}

/// nginx answering every request with the mock's chat completion.
pub fn start_static(core: usize, dir: &Path, port: u16) -> Pinned {
    let server = format!(
        r#"    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{ANSWER}';
        }}
    }}"#
    );
    launch(core, &dir.join("nginx-static"), port, &server)
}

fn launch(core: usize, dir: &Path, port: u16, server: &str) -> Pinned {
    std::fs::create_dir_all(dir).expect("nginx directory");
    let d = dir.display();
    let conf = format!(
        r#"worker_processes 1;
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
{server}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let path = path.to_str().expect("utf-8 path");
    let mut nginx = Pinned::start(
        core,
        Path::new("nginx"),
        &["-p", &d.to_string(), "-c", path, "-e", "stderr"],
        &dir.join("stdout.log"),
    );
    // nginx prints nothing when it starts well: wait for the port instead.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            nginx.stop();
            panic!(
                "nginx did not start:\n{}",
                std::fs::read_to_string(dir.join("stdout.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    nginx
}
