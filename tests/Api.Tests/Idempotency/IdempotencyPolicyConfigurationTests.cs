using Microsoft.Extensions.Configuration;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

public sealed class IdempotencyPolicyConfigurationTests
{
    private static IdempotencyPolicy Configure(string name, string value) =>
        IdempotencyPolicy.Default.Configure(new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?> { [name] = value }).Build());

    [Theory]
    [InlineData("ConcurrentDuplicates", "Wiat")]
    [InlineData("ConcurrentDuplicates", "2")]
    [InlineData("OnLapsedLease", "5")]
    [InlineData("OnLapsedLease", "-1")]
    [InlineData("OnLapsedLease", "+1")]
    [InlineData("OnLapsedLease", "Reclaim,Reclaim")]
    [InlineData("MaxStoredResponseBytes", "99999999999")]
    [InlineData("Lease", "soon")]
    [InlineData("WaitTimeout", "10")]
    [InlineData("Retention", "86400")]
    [InlineData("KeyRequired", "yes")]
    public void SettingThatIsNotValid_IsRefused_NamingIt(string name, string value)
    {
        var error = Assert.Throws<InvalidOperationException>(() => Configure(name, value));

        Assert.Contains($"{name} = '{value}'", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Durations_AreReadAsHoursMinutesAndSeconds_NotABareNumberOfDays()
    {
        Assert.Equal(TimeSpan.FromSeconds(10), Configure("WaitTimeout", "00:00:10").WaitTimeout);
        Assert.Equal(TimeSpan.FromDays(2), Configure("Retention", "2.00:00:00").Retention);
        Assert.Contains("hh:mm:ss", Assert.Throws<InvalidOperationException>(() => Configure("WaitTimeout", "10")).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void EnumSettings_AreReadByName_InAnyCase()
    {
        Assert.Equal(ConcurrentDuplicateHandling.Reject, Configure("ConcurrentDuplicates", "reject").ConcurrentDuplicates);
        Assert.Equal(LapsedLeasePolicy.Reclaim, Configure("OnLapsedLease", "RECLAIM").OnLapsedLease);
    }
}
