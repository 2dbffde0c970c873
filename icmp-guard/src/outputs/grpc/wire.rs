//! A `feeder.Alert` already encoded: the server's `WatchAlerts` stream carries these, so that an
//! alert is converted and encoded once however many clients receive it (build.rs maps the
//! generated service's `Alert` to this type).

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType},
};

/// The protobuf encoding of one `feeder.Alert` message (its fields, without a length prefix).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedAlert(pub Bytes);

impl EncodedAlert {
    pub fn encode(alert: &super::proto::Alert) -> Self {
        EncodedAlert(Bytes::from(alert.encode_to_vec()))
    }
}

impl Message for EncodedAlert {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    /// The server only sends alerts. Decoding (for completeness) goes through the full message,
    /// field by field, so the bytes kept are a valid encoding of what was read.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut message = super::proto::Alert::decode(self.0.clone())?;
        message.merge_field(tag, wire_type, buf, ctx)?;
        self.0 = Bytes::from(message.encode_to_vec());
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::grpc::proto::Alert;

    #[test]
    fn sends_the_same_bytes_as_the_message() {
        let a = Alert {
            timestamp: 7,
            process_name: "/usr/sbin/hping3".into(),
            a_tags: vec!["x".into()],
            event_data: [("Class".to_string(), "raw".to_string())].into(),
            ..Default::default()
        };
        let e = EncodedAlert::encode(&a);
        assert_eq!(e.encode_to_vec(), a.encode_to_vec());
        assert_eq!(
            e.encode_length_delimited_to_vec(),
            a.encode_length_delimited_to_vec()
        );
        assert_eq!(Alert::decode(e.0.clone()).unwrap(), a);
        let back = EncodedAlert::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(Alert::decode(back.0).unwrap(), a);
    }
}
