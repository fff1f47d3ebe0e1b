//! What `read_frame` allocates, measured by a counting global allocator (this test binary
//! only): a header claiming the maximal frame with a few bytes behind it costs about one
//! first chunk, not the claimed length; a frame that really arrives costs about its length.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use ringkv_transport::{read_frame_until, FIRST_CHUNK};
use ringkv_wire::Limits;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// Counts the bytes live on the current thread and their peak (per thread, so the other
/// tests of this binary, on their own threads, do not disturb the measurement).
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + bytes;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The peak of live bytes on this thread while `f` runs, above what was live before.
async fn peak_during<T>(f: impl std::future::Future<Output = T>) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f.await;
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

#[tokio::test(flavor = "current_thread")]
async fn a_claimed_maximal_frame_costs_only_what_arrived() {
    let max_frame = Limits::default().max_frame;
    let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
    tx.write_all(&(max_frame as u32).to_le_bytes())
        .await
        .unwrap();
    tx.write_all(&[7u8; 100]).await.unwrap();
    let deadline = Instant::now() + Duration::from_millis(200);
    let (got, peak) =
        peak_during(read_frame_until::<String, _>(&mut rx, max_frame, deadline)).await;
    assert!(matches!(got, Ok(None)), "{got:?}");
    println!("claimed {max_frame} B, sent 100 B: peak {peak} B allocated");
    assert!(
        peak < FIRST_CHUNK + 4096,
        "claimed {max_frame} B, sent 100 B, allocated {peak} B"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_frame_that_arrives_costs_about_its_length() {
    let max_frame = Limits::default().max_frame;
    let value = vec![1u8; 1 << 20];
    let frame = ringkv_wire::codec::encode(&value, max_frame).unwrap();
    let sent = frame.len();
    let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
    let writer = tokio::spawn(async move { tx.write_all(&frame).await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(10);
    let (got, peak) =
        peak_during(read_frame_until::<Vec<u8>, _>(&mut rx, max_frame, deadline)).await;
    assert_eq!(got.unwrap().unwrap(), value);
    writer.await.unwrap();
    println!("a {sent} B frame: peak {peak} B allocated (payload buffer and decoded value)");
    // The payload buffer (never past the frame's length) plus the decoded value.
    assert!(
        peak <= 2 * sent + 64 * 1024,
        "{peak} B for a {sent} B frame"
    );
}
