//! The gRPC codec of every generated service: protobuf through `prost`, as tonic's default,
//! with small starting buffers.
//!
//! tonic's default codec starts each stream with an 8 KiB decode buffer and an 8 KiB encode
//! buffer. A hub holds one long-lived, mostly idle stream per edge node, so those two buffers
//! are most of what an idle node costs it above the connection itself; they grow on demand
//! for a large message either way, so starting at [`START_BUFFER_BYTES`] changes memory, not
//! what can be sent.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Bytes each stream's encode and decode buffers start with.
pub const START_BUFFER_BYTES: usize = 1024;

/// Encoded bytes after which a streaming encoder yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Protobuf codec with small starting buffers (see the module documentation).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(START_BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
