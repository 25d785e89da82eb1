//! The `keyward` binary: parses the command line and hands over to the library.

/// Large blocks (a reload's buffers, a big ring) get transparent huge pages.
#[global_allocator]
static ALLOC: keyward::pages::LargePages = keyward::pages::LargePages;

fn main() -> std::process::ExitCode {
    keyward::cli::main()
}
