//! `tcp-probe`: one long-lived TCP connection, to show that a change (a pool's mode switch)
//! does not break established pod connections.
//!
//! `tcp-probe serve <port>`: echoes every byte back, one connection at a time.
//! `tcp-probe send <addr:port> <seconds>`: sends a numbered line every 20 ms on one
//! connection and checks each echo; prints `ok <lines> <longest gap ms>` and exits 0 if the
//! connection lasted, else prints the error and exits 1.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn serve(port: &str) -> std::io::Result<()> {
    let l = TcpListener::bind(format!("0.0.0.0:{port}"))?;
    for s in l.incoming() {
        let mut s = s?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        while r.read_line(&mut line)? > 0 {
            s.write_all(line.as_bytes())?;
            line.clear();
        }
    }
    Ok(())
}

fn send(addr: &str, secs: u64) -> Result<(u64, Duration), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut n, mut worst, mut line) = (0u64, Duration::ZERO, String::new());
    while Instant::now() < end {
        let t = Instant::now();
        writeln!(s, "{n}").map_err(|e| format!("line {n}: send: {e}"))?;
        line.clear();
        r.read_line(&mut line)
            .map_err(|e| format!("line {n}: echo: {e}"))?;
        if line.trim() != n.to_string() {
            return Err(format!("line {n}: echo {line:?}"));
        }
        worst = worst.max(t.elapsed());
        n += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((n, worst))
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--version") => {
            println!("tcp-probe {}", tessera_datastore::VERSION);
            std::process::ExitCode::SUCCESS
        }
        Some("serve") if args.len() == 3 => match serve(&args[2]) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tcp-probe: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Some("send") if args.len() == 4 => {
            let secs = args[3].parse().unwrap_or(10);
            match send(&args[2], secs) {
                Ok((n, worst)) => {
                    println!("ok {n} {}", worst.as_millis());
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("broken {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("usage: tcp-probe serve <port> | tcp-probe send <addr:port> <seconds>");
            std::process::ExitCode::from(2)
        }
    }
}
