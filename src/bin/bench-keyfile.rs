//! `bench-keyfile`: writes large synthetic key files and times parsing them
//! and building their rings.
//!
//! ```text
//! bench-keyfile --keys 1000000 --out keys.toml     # write ~150 MB
//! bench-keyfile --keys 1000000 --out keys.toml --secrets s.txt --secrets-count 200
//! bench-keyfile --parse keys.toml                  # read + parse, as the server does
//! bench-keyfile --parse keys.toml --parser full    # the full validator only
//! bench-keyfile --parse keys.toml --threads 1      # as a reload on 2 CPUs
//! ```
//!
//! Parsing prints one line of timings (milliseconds: read, UTF-8 check,
//! parse, ring build) and the process's peak
//! resident memory so far (VmHWM), so each run should parse in a fresh process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use keyward::keyfile::{self, ParseOptions, Parsed, Threads};
use keyward::ring::{FileDigest, KeyRing, UsageRegistry};

/// Writes or parses synthetic key files (see `keyward::bench_support`).
#[derive(Debug, Parser)]
#[command(name = "bench-keyfile")]
struct Args {
    /// Number of keys to write (with --out).
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Write a synthetic key file here.
    #[arg(long, conflicts_with = "parse")]
    out: Option<PathBuf>,
    /// Read and parse this key file, printing timings.
    #[arg(long)]
    parse: Option<PathBuf>,
    /// Which parser to time.
    #[arg(long, value_enum, default_value_t = Which::Auto)]
    parser: Which,
    /// Threads the load may keep busy, as `keyward serve --reload-threads`
    /// gives a reload (with `--parser fast`, up to 8 parse threads); 0: one
    /// per CPU, as at start-up.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// With --out: also write the secrets of plain keys (active, unexpired,
    /// no rate limit) here, one per line, for a load generator.
    #[arg(long, requires = "out")]
    secrets: Option<PathBuf>,
    /// How many secrets to write with --secrets.
    #[arg(long, default_value_t = 100)]
    secrets_count: usize,
    /// Do not ask for transparent huge pages for large blocks (the server
    /// does), to measure what they are worth.
    #[arg(long)]
    small_pages: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// What the server runs: the fast path, then the full validator if declined.
    Auto,
    /// The fast path only (fails if it declines the file).
    Fast,
    /// The full validator only.
    Full,
}

/// The server's allocator, so the timings are the server's.
#[global_allocator]
static ALLOC: keyward::pages::LargePages = keyward::pages::LargePages;

fn main() -> ExitCode {
    let args = Args::parse();
    // The server's allocator settings too.
    keyward::ring::configure_allocator();
    keyward::pages::set_advising(!args.small_pages);
    let result = match (&args.out, &args.parse) {
        (Some(out), None) => write(out, args.keys).and_then(|()| match &args.secrets {
            Some(path) => write_secrets(path, args.keys, args.secrets_count),
            None => Ok(()),
        }),
        (None, Some(path)) => parse(path, args.parser, args.threads),
        _ => Err("give --out FILE (with --keys N) or --parse FILE".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-keyfile: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_secrets(path: &std::path::Path, keys: usize, count: usize) -> Result<(), String> {
    use keyward::bench_support::{synthetic_key_is_plain, synthetic_secret};
    let mut text = String::new();
    // Spread over the whole file, not only its first keys.
    let stride = (keys / count.max(1)).max(1);
    for i in (0..keys)
        .step_by(stride)
        .filter(|&i| synthetic_key_is_plain(i))
        .take(count)
    {
        text.push_str(&synthetic_secret(i));
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(out: &std::path::Path, keys: usize) -> Result<(), String> {
    let start = Instant::now();
    let text = keyward::bench_support::synthetic_key_file(keys);
    std::fs::write(out, &text).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!(
        "wrote {} keys, {} bytes ({} bytes per key) to {} in {:.1}s",
        keys,
        text.len(),
        text.len() / keys.max(1),
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn parse(path: &std::path::Path, which: Which, threads: usize) -> Result<(), String> {
    let opts = ParseOptions {
        threads: match threads {
            0 => Threads::all(),
            n => Threads::new(n),
        },
        ..ParseOptions::default()
    };
    let t0 = Instant::now();
    let bytes = keyfile::read_on(path, opts.threads).map_err(|e| e.to_string())?;
    let t_read = t0.elapsed();
    let text = std::str::from_utf8(&bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let t_utf8 = t0.elapsed();
    let cpu_before = cpu_ms();
    let file = match which {
        Which::Auto => keyfile::parse_str_for_ring(text, opts).map_err(|d| format!("{d:?}"))?,
        Which::Full => {
            Parsed::Full(keyfile::parse_str_full(text, opts).map_err(|d| format!("{d:?}"))?)
        }
        Which::Fast => {
            let parsed = if threads == 0 {
                keyfile::parse_fast_compact(text, opts)
            } else {
                keyfile::parse_fast_compact_threads(text, opts, threads)
            };
            Parsed::Fast(parsed.ok_or("the fast path declined the file")?)
        }
    };
    let t_parse = t0.elapsed();
    let parse_cpu = cpu_ms().zip(cpu_before).map(|(a, b)| a.saturating_sub(b));
    let usage = UsageRegistry::default();
    let ring = KeyRing::build_parsed(
        &file,
        1,
        jiff::Timestamp::now(),
        FileDigest::known([0; 32]),
        &usage,
        None,
        opts.threads,
    );
    let t_build = t0.elapsed();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "parser={which:?} threads={threads} keys={} bytes={} read_ms={:.1} utf8_ms={:.1} parse_ms={:.1} parse_cpu_ms={} build_ms={:.1} total_ms={:.1} peak_rss_mb={}",
        ring.len(),
        bytes.len(),
        ms(t_read),
        ms(t_utf8 - t_read),
        ms(t_parse - t_utf8),
        parse_cpu.map_or_else(|| "?".to_owned(), |m| m.to_string()),
        ms(t_build - t_parse),
        ms(t_build),
        peak_rss_mb().map_or_else(|| "?".to_owned(), |m| m.to_string()),
    );
    // Freeing the parsed file takes time too; measure it separately.
    let t_drop = Instant::now();
    drop(file);
    println!("drop_ms={:.1}", ms(t_drop.elapsed()));
    Ok(())
}

/// CPU time (user + system) used by this process so far, in milliseconds,
/// at the kernel's clock-tick resolution (Linux; assumes 100 ticks a second).
/// On a busy machine it says what a parse costs better than the wall clock.
fn cpu_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10)
}

/// Peak resident set size of this process, in MiB (Linux).
fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}
