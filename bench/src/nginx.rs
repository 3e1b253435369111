//! The baseline proxy: nginx (Debian's `nginx-light`) as a plain keep-alive reverse
//! proxy, one worker process, pinned to the gateway's core.

use std::path::Path;
use std::time::Duration;

use crate::procs::Pinned;

pub fn start(core: usize, dir: &Path, port: u16, upstream: &str) -> Pinned {
    let dir = dir.join("nginx");
    std::fs::create_dir_all(&dir).expect("nginx directory");
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
    upstream mock {{
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
    }}
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
