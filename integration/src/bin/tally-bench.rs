//! `cargo bench-tally <scenario>...`: tally's load generator and the
//! SPEC §8 benchmark. Everything lives in `tally_integration::bench`.

/// The same allocator as `tally-proxy`: the proxy child (`__proxy`) and
/// the bare-server baseline (`__bare`) run in this executable.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tally_integration::bench::main()
}
