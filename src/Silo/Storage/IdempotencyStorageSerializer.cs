using System.Buffers;
using System.Buffers.Binary;
using Orleans.Serialization;
using Orleans.Storage;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// Stores grain state with Orleans' own binary serializer (version-tolerant through <c>[Id]</c>s, and far cheaper
/// than JSON), behind a 16-byte header of two big-endian Unix-millisecond times that PostgreSQL reads (see
/// <c>PostgresSchema.sql</c>): when the record may be purged (<see cref="IdempotencyRecord.PurgeableAt"/>), into the
/// indexed <c>ExpiresAt</c> column so expired rows can be purged without decoding payloads; and the time after which
/// the write must not land at all.
/// </summary>
/// <remarks>
/// A write can reach PostgreSQL long after the grain sent it: queued behind a network partition, or retransmitted
/// by TCP once the partition heals. For a claim that is harmful: its caller gave up long ago (and was told nothing
/// ran), yet the claim would land and, its lease already over, leave the key "outcome unknown" although the
/// action never ran. So a claim is valid only until its lease ends, and PostgreSQL refuses it after that (the
/// grain then sees a version conflict). Other records are valid whenever they land.
/// </remarks>
public sealed class IdempotencyStorageSerializer(Serializer serializer) : IGrainStorageSerializer
{
    /// <summary>The length of the header: the expiry, then the time the write is valid until.</summary>
    public const int HeaderLength = 2 * sizeof(long);

    public BinaryData Serialize<T>(T? input)
    {
        var buffer = new ArrayBufferWriter<byte>(256);
        Serialize(input, buffer);
        return new BinaryData(buffer.WrittenMemory);
    }

    /// <summary>Writes what <see cref="Serialize{T}(T)"/> returns into <paramref name="output"/>.</summary>
    public void Serialize<T>(T? input, IBufferWriter<byte> output)
    {
        var (expiresAt, validUntil) = input is IdempotencyRecord record
            ? (record.PurgeableAt, record.Status == IdempotencyStatus.InProgress ? record.LeaseExpiresAt : DateTimeOffset.MaxValue)
            : (DateTimeOffset.MaxValue, DateTimeOffset.MaxValue);
        var header = output.GetSpan(HeaderLength);
        BinaryPrimitives.WriteInt64BigEndian(header, expiresAt.ToUnixTimeMilliseconds());
        BinaryPrimitives.WriteInt64BigEndian(header[sizeof(long)..], validUntil.ToUnixTimeMilliseconds());
        output.Advance(HeaderLength);
        serializer.Serialize(input, output);
    }

    public T Deserialize<T>(BinaryData input) =>
        serializer.Deserialize<T>(input.ToMemory().Span[HeaderLength..])
        ?? throw new InvalidDataException($"Stored state of {typeof(T).Name} decoded to null.");
}
