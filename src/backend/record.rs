//! A [`TokenOut`] for unit tests of backends: it records every call, never
//! blocks or sleeps, and can play a cancel after a given number of tokens,
//! so a backend is tested on the test's own thread without a pool.

use std::cell::{Cell, RefCell};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use super::{Cancelled, TokenOut};

/// One call a backend made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// A choice's other fields, raw (`push_delta`).
    Delta(String),
    Token(String),
    Sleep(Duration),
    /// `set_upstream`: whether a socket was registered (`false`: cleared).
    Upstream(bool),
}

/// Records calls; cancelled from the start, or once it has taken
/// `cancel_after` tokens.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    calls: RefCell<Vec<Call>>,
    cancel_after: Option<usize>,
    tokens: Cell<usize>,
    cancelled: Cell<bool>,
}

impl Recorder {
    pub(crate) fn new() -> Recorder {
        Recorder::default()
    }

    /// Takes `n` tokens, then acts cancelled (refuses the next one).
    pub(crate) fn cancel_after(n: usize) -> Recorder {
        Recorder {
            cancel_after: Some(n),
            cancelled: Cell::new(n == 0),
            ..Recorder::default()
        }
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// The text of the tokens taken, in order.
    pub(crate) fn tokens(&self) -> Vec<String> {
        self.calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                Call::Token(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }
}

impl TokenOut for Recorder {
    fn push_token(&self, text: &str) -> Result<(), Cancelled> {
        if self.cancelled.get() {
            return Err(Cancelled);
        }
        if text.is_empty() {
            return Ok(());
        }
        self.calls.borrow_mut().push(Call::Token(text.to_owned()));
        self.tokens.set(self.tokens.get() + 1);
        if self.cancel_after == Some(self.tokens.get()) {
            self.cancelled.set(true);
        }
        Ok(())
    }

    fn push_delta(&self, raw: &str) -> Result<(), Cancelled> {
        if self.cancelled.get() {
            return Err(Cancelled);
        }
        self.calls.borrow_mut().push(Call::Delta(raw.to_owned()));
        Ok(())
    }

    fn sleep(&self, d: Duration) -> Result<(), Cancelled> {
        if self.cancelled.get() {
            return Err(Cancelled);
        }
        self.calls.borrow_mut().push(Call::Sleep(d));
        Ok(())
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.get()
    }

    fn set_upstream(&self, sock: Option<TcpStream>) {
        if let (Some(s), true) = (&sock, self.cancelled.get()) {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.calls.borrow_mut().push(Call::Upstream(sock.is_some()));
    }
}
