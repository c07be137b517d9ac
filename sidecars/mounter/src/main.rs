//! `ferrovol-mounter`: serves mount requests from the node plugin over a unix socket.
fn main() {}
