using System.Buffers;
using System.Buffers.Binary;
using Orleans.Serialization;
using Orleans.Storage;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// Stores grain state with Orleans' own binary serializer (version-tolerant through <c>[Id]</c>s, and far cheaper
/// than JSON), behind an 8-byte header: the record's expiry as big-endian Unix milliseconds. PostgreSQL reads the
/// header into the indexed <c>ExpiresAt</c> column (see <c>PostgresSchema.sql</c>) so expired rows can be purged
/// without decoding payloads.
/// </summary>
public sealed class IdempotencyStorageSerializer(Serializer serializer) : IGrainStorageSerializer
{
    /// <summary>The length of the expiry header.</summary>
    public const int HeaderLength = sizeof(long);

    public BinaryData Serialize<T>(T? input)
    {
        var expiresAt = input is IdempotencyRecord record ? record.ExpiresAt : DateTimeOffset.MaxValue;
        var buffer = new ArrayBufferWriter<byte>(256);
        BinaryPrimitives.WriteInt64BigEndian(buffer.GetSpan(HeaderLength), expiresAt.ToUnixTimeMilliseconds());
        buffer.Advance(HeaderLength);
        serializer.Serialize(input, buffer);
        return new BinaryData(buffer.WrittenMemory);
    }

    public T Deserialize<T>(BinaryData input) =>
        serializer.Deserialize<T>(input.ToMemory().Span[HeaderLength..])
        ?? throw new InvalidDataException($"Stored state of {typeof(T).Name} decoded to null.");
}
