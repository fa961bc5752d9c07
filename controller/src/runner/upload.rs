//! A multipart upload with bounded memory: one part being filled plus at most `max_in_flight`
//! parts on their way. Nothing is visible under the object's name until [`Upload::finish`]
//! completed; [`Upload::abort`] discards what was sent.

use bytes::BytesMut;
use object_store::{MultipartUpload, PutPayload, PutResult};
use tokio::task::JoinSet;

/// How long an abort waits for the parts in flight (at most `max_in_flight` parts).
const ABORT_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Upload {
    upload: Box<dyn MultipartUpload>,
    part: BytesMut,
    part_size: usize,
    max_in_flight: usize,
    in_flight: JoinSet<object_store::Result<()>>,
}

impl Upload {
    pub fn new(upload: Box<dyn MultipartUpload>, part_size: usize, max_in_flight: usize) -> Self {
        Upload {
            upload,
            part: BytesMut::with_capacity(part_size),
            part_size,
            max_in_flight: max_in_flight.max(1),
            in_flight: JoinSet::new(),
        }
    }

    /// Buffers `data`, sending each part as it fills; waits while too many parts are in flight.
    pub async fn write(&mut self, mut data: &[u8]) -> object_store::Result<()> {
        while !data.is_empty() {
            let room = self.part_size - self.part.len();
            let take = room.min(data.len());
            self.part.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.part.len() == self.part_size {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn send_part(&mut self) -> object_store::Result<()> {
        while self.in_flight.len() >= self.max_in_flight {
            self.join_one().await?;
        }
        let part = std::mem::replace(&mut self.part, BytesMut::with_capacity(self.part_size));
        self.in_flight
            .spawn(self.upload.put_part(PutPayload::from(part.freeze())));
        Ok(())
    }

    async fn join_one(&mut self) -> object_store::Result<()> {
        match self.in_flight.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(join)) => Err(object_store::Error::Generic {
                store: "upload",
                source: Box::new(join),
            }),
            None => Ok(()),
        }
    }

    /// Sends the last part, waits for every part and completes the upload: only now does the
    /// object exist. On error, call [`Upload::abort`].
    pub async fn finish(&mut self) -> object_store::Result<PutResult> {
        if !self.part.is_empty() {
            self.send_part().await?;
        }
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        self.upload.complete().await
    }

    /// Discards the upload (S3: AbortMultipartUpload; a file: its staging file is removed) once
    /// the parts in flight have ended. Cancelling them instead would only drop the client's side:
    /// a part the store was still receiving is then stored after the abort, and stays (S3 says an
    /// abort may have to be repeated for that reason; versitygw keeps such a part for good).
    pub async fn abort(mut self) -> object_store::Result<()> {
        let drained = async {
            while !self.in_flight.is_empty() {
                let _ = self.join_one().await;
            }
        };
        if tokio::time::timeout(ABORT_DRAIN, drained).await.is_err() {
            self.in_flight.shutdown().await;
        }
        self.upload.abort().await
    }
}
