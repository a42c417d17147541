//! Demo workload: counts up once every 200 ms and prints each number with
//! its pid and a checksum of the memory it keeps, so a restored counter
//! visibly carries on from where it was.

use std::io::Write;
use std::time::Duration;

fn main() {
    // Some state worth keeping: a heap buffer that changes every tick.
    let mut data: Vec<u64> = (0..1 << 20).collect();
    let mut n: u64 = 0;
    let pid = std::process::id();
    loop {
        let i = (n as usize * 7919) % data.len();
        data[i] = data[i].wrapping_mul(31).wrapping_add(n);
        let sum = data.iter().fold(0u64, |a, &x| a.wrapping_add(x));
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "pid {pid} count {n} checksum {sum:016x}");
        let _ = out.flush();
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
}
