//! More than one thread for one stream: the thread that decodes (decrypts, decompresses)
//! keeps doing that while another consumes what it produced (extracts it, compares it with
//! what is on disk) and, optionally, a third taps every byte (the chunk's SHA-1). A restore
//! of one large object (a stream-format `base.tar`) otherwise runs every stage on one core.
//!
//! The bytes cross in pieces of [`PIECE`] through channels of [`DEPTH`] pieces each; a
//! piece goes back to be refilled once every thread is done with it. A new piece is made
//! only when none is back, so at most `2 × DEPTH + 3` pieces exist (`DEPTH + 2` without a
//! tap) per stream, whatever its size, and the producer reads ahead at most that far. The
//! consumer and the tap see exactly the bytes `src` gives, in order; the consumer gets an
//! error of `src` where it happened.

use std::io::{self, Read};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;

/// Bytes handed over at once.
pub const PIECE: usize = 1 << 20;
/// Pieces queued for each thread.
pub const DEPTH: usize = 4;

type Piece = Arc<Vec<u8>>;

/// Runs `consume` on a new thread, reading what this thread reads from `src`; returns what
/// `consume` returned. If `consume` returns early (done or failed), reading `src` stops.
/// If `src` fails, `consume` gets that error at the point the bytes stop.
pub fn pipelined<T, F>(src: &mut dyn Read, consume: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce(&mut dyn Read) -> io::Result<T> + Send,
{
    let (t, _) = run(src, None::<fn(&[u8])>, consume)?;
    Ok(t)
}

/// [`pipelined`], and `tap` called on a third thread with every byte `src` gave, in order,
/// up to where reading stopped (the end, an error, or `consume` returning). Returns what
/// `consume` returned and the tap.
pub fn pipelined_tapped<T, H, F>(src: &mut dyn Read, tap: H, consume: F) -> io::Result<(T, H)>
where
    T: Send,
    H: FnMut(&[u8]) + Send,
    F: FnOnce(&mut dyn Read) -> io::Result<T> + Send,
{
    let (t, tap) = run(src, Some(tap), consume)?;
    Ok((t, tap.expect("the tap is given back")))
}

fn run<T, H, F>(src: &mut dyn Read, tap: Option<H>, consume: F) -> io::Result<(T, Option<H>)>
where
    T: Send,
    H: FnMut(&[u8]) + Send,
    F: FnOnce(&mut dyn Read) -> io::Result<T> + Send,
{
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<Piece>>(DEPTH);
    // Unbounded, so a thread giving a piece back never waits; what it holds is bounded by
    // the pieces that exist (module comment).
    let (back_tx, back_rx) = mpsc::channel::<Piece>();
    std::thread::scope(|s| {
        let tapping = match tap {
            Some(mut tap) => {
                let (tx, rx) = mpsc::sync_channel::<Piece>(DEPTH);
                let back = back_tx.clone();
                let h = std::thread::Builder::new()
                    .name("restore-tap".into())
                    .spawn_scoped(s, move || {
                        for piece in rx {
                            tap(&piece);
                            let _ = back.send(piece);
                        }
                        tap
                    })?;
                Some((tx, h))
            }
            None => None,
        };
        let consumer = std::thread::Builder::new()
            .name("restore-consume".into())
            .spawn_scoped(s, move || {
                let mut r = Pieces {
                    full: full_rx,
                    back: back_tx,
                    cur: None,
                    at: 0,
                    done: false,
                    failed: false,
                };
                consume(&mut r)
            })?;
        let (tap_tx, tap_handle) = match tapping {
            Some((tx, h)) => (Some(tx), Some(h)),
            None => (None, None),
        };
        produce(src, &full_tx, tap_tx.as_ref(), &back_rx);
        // The others see the end of the stream when the senders are gone.
        drop(full_tx);
        drop(tap_tx);
        let consumed = consumer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the restore's consuming thread panicked")));
        let tap = match tap_handle.map(|h| h.join()) {
            None => None,
            Some(Ok(tap)) => Some(tap),
            Some(Err(_)) => return Err(io::Error::other("the restore's hashing thread panicked")),
        };
        Ok((consumed?, tap))
    })
}

/// Fills pieces from `src` and sends them until the end, an error (sent after the bytes
/// read before it), or the consumer (or tap) is gone.
fn produce(
    src: &mut dyn Read,
    full: &SyncSender<io::Result<Piece>>,
    tap: Option<&SyncSender<Piece>>,
    back: &Receiver<Piece>,
) {
    loop {
        let mut buf = reusable(back).unwrap_or_else(|| Vec::with_capacity(PIECE));
        let error = fill(src, &mut buf);
        let len = buf.len();
        if len > 0 {
            let piece = Arc::new(buf);
            if let Some(tap) = tap {
                if tap.send(piece.clone()).is_err() {
                    return;
                }
            }
            if full.send(Ok(piece)).is_err() {
                return;
            }
        }
        if let Some(e) = error {
            let _ = full.send(Err(e));
            return;
        }
        if len < PIECE {
            return;
        }
    }
}

/// A piece given back by every thread that had it, if there is one. A piece given back by
/// one of two holders is dropped here; the other's return makes it reusable.
fn reusable(back: &Receiver<Piece>) -> Option<Vec<u8>> {
    while let Ok(piece) = back.try_recv() {
        if let Ok(v) = Arc::try_unwrap(piece) {
            return Some(v);
        }
    }
    None
}

/// Reads into `buf` until it holds [`PIECE`] bytes or `src` ends; an error stops it, with
/// the bytes read before it in `buf`.
fn fill(src: &mut dyn Read, buf: &mut Vec<u8>) -> Option<io::Error> {
    buf.resize(PIECE, 0);
    let mut n = 0;
    let mut error = None;
    while n < PIECE {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    buf.truncate(n);
    error
}

/// The consuming side: a reader over the pieces as they arrive.
struct Pieces {
    full: Receiver<io::Result<Piece>>,
    back: Sender<Piece>,
    cur: Option<Piece>,
    at: usize,
    /// The producer is finished: the end of the stream.
    done: bool,
    /// An error was handed out: every later read fails too.
    failed: bool,
}

impl Pieces {
    /// Makes the next piece current; false at the end of the stream.
    fn next_piece(&mut self) -> io::Result<bool> {
        if self.failed {
            return Err(io::Error::other("read after the stream failed"));
        }
        if self.done {
            return Ok(false);
        }
        let next = match self.full.recv() {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                self.failed = true;
                return Err(e);
            }
            Err(_) => {
                self.done = true;
                return Ok(false);
            }
        };
        if let Some(old) = self.cur.replace(next) {
            // The producer may have finished already: then nobody needs it back.
            let _ = self.back.send(old);
        }
        self.at = 0;
        Ok(true)
    }

    fn left(&self) -> &[u8] {
        self.cur.as_deref().map_or(&[], |c| &c[self.at..])
    }
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left().is_empty() {
            if !self.next_piece()? {
                return Ok(0);
            }
        }
        let left = self.left();
        let n = buf.len().min(left.len());
        buf[..n].copy_from_slice(&left[..n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads in pieces of a size that cycles, so piece and read boundaries never line up.
    struct Ragged<'a> {
        data: &'a [u8],
        step: usize,
        fail_at: Option<usize>,
        read: usize,
    }

    impl Read for Ragged<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.fail_at.is_some_and(|f| self.read >= f) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk"));
            }
            self.step = self.step % 70_001 + 4_099;
            let mut n = buf.len().min(self.step).min(self.data.len());
            if let Some(f) = self.fail_at {
                n = n.min(f - self.read);
            }
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.read += n;
            Ok(n)
        }
    }

    fn ragged(data: &[u8], fail_at: Option<usize>) -> Ragged<'_> {
        Ragged {
            data,
            step: 1,
            fail_at,
            read: 0,
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn read_all(r: &mut dyn Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut b = vec![0u8; 8191];
        loop {
            match r.read(&mut b)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&b[..n]),
            }
        }
    }

    #[test]
    fn the_consumer_and_the_tap_see_every_byte_in_order() {
        for len in [0, 1, PIECE - 1, PIECE, PIECE + 1, 19 * PIECE + 12_345] {
            let d = data(len);
            let got = pipelined(&mut ragged(&d, None), read_all).unwrap();
            assert!(got == d, "len {len}");
            let mut tapped = Vec::new();
            let (got, _) = pipelined_tapped(
                &mut ragged(&d, None),
                |b: &[u8]| tapped.extend_from_slice(b),
                read_all,
            )
            .unwrap();
            assert!(tapped == d, "len {len}, tapped");
            assert!(got == d, "len {len}, tapped");
        }
    }

    /// The tap gets the same bytes as the consumer, whatever the two threads' speeds.
    #[test]
    fn the_tap_gets_the_whole_stream() {
        let d = data(23 * PIECE + 777);
        let mut tapped = Vec::new();
        let (got, _) = pipelined_tapped(
            &mut ragged(&d, None),
            |b: &[u8]| tapped.extend_from_slice(b),
            |r| {
                let mut out = Vec::new();
                let mut b = vec![0u8; 100_003];
                loop {
                    // A slow consumer: the producer and the tap run ahead.
                    std::thread::yield_now();
                    match r.read(&mut b)? {
                        0 => return Ok(out),
                        n => out.extend_from_slice(&b[..n]),
                    }
                }
            },
        )
        .unwrap();
        assert!(got == d);
        assert!(tapped == d);
    }

    /// An error of the source reaches the consumer after exactly the bytes before it, and
    /// the consumer cannot mistake it for the end of the stream by reading again.
    #[test]
    fn an_error_comes_after_the_bytes_before_it() {
        let d = data(3 * PIECE);
        let fail_at = PIECE + 5000;
        let mut tapped = 0;
        let ((n, err, again), _) = pipelined_tapped(
            &mut ragged(&d, Some(fail_at)),
            |b: &[u8]| tapped += b.len(),
            |r| {
                let mut out = Vec::new();
                let err = loop {
                    let mut b = vec![0u8; 10_000];
                    match r.read(&mut b) {
                        Ok(0) => panic!("the failure looked like the end"),
                        Ok(n) => out.extend_from_slice(&b[..n]),
                        Err(e) => break e,
                    }
                };
                assert!(out == d[..fail_at]);
                let again = r.read(&mut [0u8; 10]).is_err();
                Ok((out.len(), err, again))
            },
        )
        .unwrap();
        assert_eq!(n, fail_at);
        assert_eq!(tapped, fail_at);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("bad chunk"), "{err}");
        assert!(again);
    }

    /// A consumer that stops early (failed, or has what it needs) stops the producer: no hang,
    /// with or without a tap, and the source is not read much further.
    #[test]
    fn a_consumer_that_stops_early_stops_the_reading() {
        let d = data(64 * PIECE);
        let stop = |r: &mut dyn Read| -> io::Result<()> {
            let mut b = vec![0u8; 100];
            r.read_exact(&mut b)?;
            Err(io::Error::other("extract failed"))
        };
        let mut src = ragged(&d, None);
        let err = pipelined(&mut src, stop).unwrap_err();
        assert!(err.to_string().contains("extract failed"));
        assert!(
            src.read <= (DEPTH + 3) * PIECE,
            "read {} bytes ahead",
            src.read
        );
        let mut src = ragged(&d, None);
        let err = pipelined_tapped(&mut src, |_: &[u8]| {}, stop)
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("extract failed"));
        assert!(
            src.read <= (2 * DEPTH + 4) * PIECE,
            "read {} bytes ahead",
            src.read
        );
    }
}
