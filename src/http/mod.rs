//! HTTP/1.1 request parsing and limits; response heads and body codecs live
//! beside it.

pub mod request;
pub mod response;

pub use request::*;
