using System.Buffers.Binary;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Tests;

public sealed class IdempotencyStorageSerializerTests
{
    private static readonly DateTimeOffset Now = new(2026, 1, 1, 0, 0, 0, TimeSpan.Zero);

    private static readonly IdempotencyStorageSerializer Serializer = TestSerializer.Storage;

    private static (DateTimeOffset PurgeableAt, DateTimeOffset ValidUntil) Header(IdempotencyRecord record)
    {
        var bytes = Serializer.Serialize(record).ToMemory().Span;
        return (DateTimeOffset.FromUnixTimeMilliseconds(BinaryPrimitives.ReadInt64BigEndian(bytes)),
            DateTimeOffset.FromUnixTimeMilliseconds(BinaryPrimitives.ReadInt64BigEndian(bytes[sizeof(long)..])));
    }

    [Fact]
    public void Header_OfAClaimWhoseLeaseOutlastsItsRetention_KeepsTheRowUntilTheLeaseEnds()
    {
        var claim = new IdempotencyRecord { Status = IdempotencyStatus.InProgress, ExpiresAt = Now.AddHours(1), LeaseExpiresAt = Now.AddHours(3) };

        Assert.Equal((Now.AddHours(3), Now.AddHours(3)), Header(claim));
    }

    [Fact]
    public void Header_OfACompletedRecord_IsItsExpiry_AndItMayLandAnyTime()
    {
        var completed = new IdempotencyRecord { Status = IdempotencyStatus.Completed, ExpiresAt = Now.AddHours(24), LeaseExpiresAt = Now.AddHours(30) };

        var (purgeableAt, validUntil) = Header(completed);

        Assert.Equal(Now.AddHours(24), purgeableAt);
        Assert.True(validUntil > Now.AddYears(1000));
    }

    [Fact]
    public void Record_WrittenBeforeTheHeaderHadItsFormatByte_IsStillRead()
    {
        var record = new IdempotencyRecord { Status = IdempotencyStatus.Completed, ExpiresAt = Now.AddHours(24), FencingToken = 7 };
        var written = Serializer.Serialize(record).ToArray();
        Assert.Equal(IdempotencyStorageSerializer.Format, written[16]);
        // The 16-byte header, then Orleans' encoding straight after it, as rows were written before the format byte.
        var legacy = written[..16].Concat(written[17..]).ToArray();
        Assert.True(legacy[16] >= 0x20);

        var read = Serializer.Deserialize<IdempotencyRecord>(new BinaryData(legacy));

        Assert.Equal(record.ExpiresAt, read.ExpiresAt);
        Assert.Equal(7, read.FencingToken);
    }

    [Fact]
    public void Record_InAFormatThisVersionDoesNotKnow_IsRefused_NotMisread()
    {
        var written = Serializer.Serialize(new IdempotencyRecord { Status = IdempotencyStatus.Completed }).ToArray();
        written[16] = IdempotencyStorageSerializer.Format + 1;

        var refused = Assert.Throws<InvalidDataException>(() => Serializer.Deserialize<IdempotencyRecord>(new BinaryData(written)));

        Assert.Contains("upgrade every silo", refused.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Record_RoundTripsBehindTheHeader()
    {
        var record = new IdempotencyRecord
        {
            Status = IdempotencyStatus.Completed,
            ExpiresAt = Now.AddHours(24),
            Response = new StoredResponse(201, [new("Location", "/orders/7")], [1, 2, 3], false, 3, [new("grpc-status", "0")]),
        };

        var read = Serializer.Deserialize<IdempotencyRecord>(Serializer.Serialize(record));

        Assert.Equal(record.ExpiresAt, read.ExpiresAt);
        Assert.Equal(record.Response.Body, read.Response!.Body);
        Assert.Equal(record.Response.Headers, read.Response.Headers);
        Assert.Equal(record.Response.Trailers, read.Response.Trailers);
    }

    [Fact]
    public void Record_StoredBeforeResponsesHadTrailers_IsReadWithoutThem()
    {
        // A completed record as the version before trailers wrote it (Location: /orders/7, body 1 2 3, fencing token 7).
        const string Stored = "AAABm3wBBAAAAOZ30h/b/wEg6AAJQQFBIQAAAAAAAAAAAAAAAAAAAAABHSGAAAAAAAAAAACBAAAAAAAAAADgIYAAAAAAAAAAAIEAAAAAAAAAAOAhgADAYd+RSd4IgQAAAAAAAAAA4CHoAEoGMQE3+ZE2f1JlYWRPbmx5TGlzdEludGVyZmFjZUNvZGVjYDFbW09ybGVhbnNJZGVtcG90ZW5jeS5TdG9yZWRIZWFkZXJdXQADIehAEUxvY2F0aW9uQRMvb3JkZXJzLzfg4EEHAQIDAQEBDeCBAAAAAAAAAADg";

        var read = Serializer.Deserialize<IdempotencyRecord>(new BinaryData(Convert.FromBase64String(Stored)));

        Assert.Equal(7, read.FencingToken);
        Assert.Equal([new StoredHeader("Location", "/orders/7")], read.Response!.Headers);
        Assert.Equal([1, 2, 3], read.Response.Body);
        Assert.Null(read.Response.Trailers);
    }
}
