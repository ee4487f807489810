//! HTTP/1.1 request parsing and limits; response heads and body codecs live
//! beside it (the chunked decoder is shared with the upstream client).

pub mod chunked;
pub mod request;
pub mod response;

pub use request::*;
