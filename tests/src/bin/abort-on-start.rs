//! A program that aborts as soon as it starts: what `vsockd upgrade` must
//! survive when the binary on disk is broken.

fn main() {
    std::process::abort();
}
